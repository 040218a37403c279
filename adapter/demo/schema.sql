-- "ClinicWare PM 4": the embedded demo practice-management database.
--
-- A legacy-style schema of this project's own design, written to exercise what real
-- legacy schedulers do: upper-case abbreviated names, space-padded CHAR mnemonic keys,
-- dates as YYYYMMDD integers, times as HHMM integers, durations in minutes, one-letter
-- status codes, a counter table for key allocation and zone-less local times (the
-- mapping declares the IANA zone, America/New_York).
--
-- Portable DDL: the same file loads into SQLite, PostgreSQL and MariaDB (statements are
-- separated by ';' at line end; no vendor types, no triggers, no sequences).

CREATE TABLE FACILITY (
  FAC_ID      INTEGER      NOT NULL PRIMARY KEY,
  FAC_NAME    VARCHAR(60)  NOT NULL,
  ADDR1       VARCHAR(60),
  CITY        VARCHAR(40),
  STATE       CHAR(2),
  ZIP         VARCHAR(10),
  PHONE       VARCHAR(20)
);

-- PROV_ID is a space-padded mnemonic ('SPEARSB ' in CHAR(8)); the mapping trims it
-- for the FHIR id and pads it back for the legacy key.
CREATE TABLE PROVIDER (
  PROV_ID     CHAR(8)      NOT NULL PRIMARY KEY,
  LAST_NM     VARCHAR(35)  NOT NULL,
  FIRST_NM    VARCHAR(25),
  TITLE       VARCHAR(10),
  SPEC_CD     VARCHAR(4)   NOT NULL,
  NPI         VARCHAR(10),
  HOME_FAC    INTEGER,
  ACTIVE_YN   CHAR(1)      NOT NULL
);

CREATE TABLE PATIENT (
  PAT_ID      INTEGER      NOT NULL PRIMARY KEY,
  MRN         VARCHAR(12)  NOT NULL UNIQUE,
  LAST_NM     VARCHAR(35)  NOT NULL,
  FIRST_NM    VARCHAR(25),
  MIDDLE_NM   VARCHAR(25),
  BIRTH_DT    INTEGER,
  SEX         CHAR(1),
  PHONE       VARCHAR(20),
  ADDR1       VARCHAR(60),
  CITY        VARCHAR(40),
  STATE       CHAR(2),
  ZIP         VARCHAR(10)
);

-- Visit types. SPEC_CD NULL = offered by every specialty.
CREATE TABLE APPT_TYPE (
  TYPE_CD     VARCHAR(6)   NOT NULL PRIMARY KEY,
  DESCR       VARCHAR(40)  NOT NULL,
  DUR_MIN     INTEGER      NOT NULL,
  SPEC_CD     VARCHAR(4)
);

-- Weekly working-hour templates. DAY_OF_WEEK 1 = Monday .. 7 = Sunday.
-- EFF_THRU NULL = open-ended.
CREATE TABLE PROV_TEMPLATE (
  TMPL_ID     INTEGER      NOT NULL PRIMARY KEY,
  PROV_ID     CHAR(8)      NOT NULL,
  FAC_ID      INTEGER      NOT NULL,
  DAY_OF_WEEK INTEGER      NOT NULL,
  START_HHMM  INTEGER      NOT NULL,
  END_HHMM    INTEGER      NOT NULL,
  EFF_FROM    INTEGER      NOT NULL,
  EFF_THRU    INTEGER
);

-- Exceptions to the templates: vacation days, meetings, training.
CREATE TABLE PROV_BLOCK (
  BLOCK_ID    INTEGER      NOT NULL PRIMARY KEY,
  PROV_ID     CHAR(8)      NOT NULL,
  BLOCK_DT    INTEGER      NOT NULL,
  START_HHMM  INTEGER      NOT NULL,
  END_HHMM    INTEGER      NOT NULL,
  REASON      VARCHAR(40)
);

-- Appointments. STATUS_CD: S scheduled, A arrived, D done/checked out, C cancelled by staff,
-- P cancelled by patient, L late cancellation (< 24 h), N no-show.
CREATE TABLE APPT (
  APPT_ID     INTEGER      NOT NULL PRIMARY KEY,
  PAT_ID      INTEGER      NOT NULL,
  PROV_ID     CHAR(8)      NOT NULL,
  FAC_ID      INTEGER      NOT NULL,
  APPT_DT     INTEGER      NOT NULL,
  APPT_TM     INTEGER      NOT NULL,
  DUR_MIN     INTEGER      NOT NULL,
  TYPE_CD     VARCHAR(6),
  STATUS_CD   CHAR(1)      NOT NULL,
  CANCEL_RSN  VARCHAR(40),
  NOTE_TXT    VARCHAR(255),
  BOOKED_BY   VARCHAR(40),
  CREATED_TS  VARCHAR(14)
);

-- The busy-time query behind every uncached $find (a practitioner's appointments in a date
-- range, by status) reads only this index: the trailing columns are the ones it selects, so the
-- server never visits the table rows (MariaDB's server CPU for that query halves). ITI-118's
-- practitioner search, ordered by date and time, is served in index order too.
CREATE INDEX APPT_PROV_DT ON APPT (PROV_ID, APPT_DT, APPT_TM, STATUS_CD, DUR_MIN, APPT_ID);
CREATE INDEX APPT_PAT_DT ON APPT (PAT_ID, APPT_DT);
CREATE INDEX APPT_DT_TM ON APPT (APPT_DT, APPT_TM);
CREATE INDEX TMPL_PROV ON PROV_TEMPLATE (PROV_ID);
CREATE INDEX BLOCK_PROV_DT ON PROV_BLOCK (PROV_ID, BLOCK_DT);

-- Key allocation the legacy way: read and increment under the booking lock.
CREATE TABLE ID_COUNTER (
  CTR_NAME    VARCHAR(20)  NOT NULL PRIMARY KEY,
  NEXT_VAL    INTEGER      NOT NULL
);
