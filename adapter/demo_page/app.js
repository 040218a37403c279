// The demo booking page: plain JavaScript on the public FHIR API (IHE ITI Scheduling).
// $find (ITI-115) lists times, $hold (ITI-116) keeps one, $book (ITI-117) books or cancels it,
// Appointment search (ITI-118) lists "my appointments". No private endpoint, no build step.
"use strict";

const HOLD_EXPIRATION = "https://sched-adapter.example.org/fhir/StructureDefinition/hold-expiration";
const STATUS_REASON = "https://profiles.ihe.net/ITI/Scheduling/StructureDefinition/extension-status-reason";
const STATUS_REASON_SYSTEM = "https://profiles.ihe.net/ITI/Scheduling/CodeSystem/status-reason";
// One client identity per page load: the server ties a hold to the client that made it.
const CLIENT_ID = "demo-page-" + Math.random().toString(36).slice(2, 10);

const $ = (id) => document.getElementById(id);
let held = null;        // the held Appointment
let countdownTimer = null;

function base() {
  return ($("base").value || (location.origin + "/fhir")).replace(/\/$/, "");
}

async function fhir(method, path, body, query) {
  const url = new URL(path.startsWith("http") ? path : base() + "/" + path);
  for (const [k, v] of query || []) url.searchParams.append(k, v);
  const headers = { "Accept": "application/fhir+json", "X-Client-Id": CLIENT_ID };
  const token = $("token").value.trim();
  if (token) headers["Authorization"] = "Bearer " + token;
  if (body) headers["Content-Type"] = "application/fhir+json";
  let response;
  try {
    response = await fetch(url, { method, headers, body: body ? JSON.stringify(body) : undefined });
  } catch (err) {
    throw new Error("The server cannot be reached (" + err.message + ").");
  }
  let json = null;
  try { json = await response.json(); } catch (_) { json = null; }
  if (!response.ok) {
    const error = new Error(outcomeText(json) || ("HTTP " + response.status));
    error.status = response.status;
    throw error;
  }
  return json;
}

function outcomeText(body) {
  if (!body) return "";
  const outcomes = body.resourceType === "OperationOutcome" ? [body]
    : (body.entry || []).map((e) => e.resource).filter((r) => r.resourceType === "OperationOutcome");
  return outcomes.flatMap((o) => o.issue || [])
    .filter((i) => i.severity === "fatal" || i.severity === "error")
    .map((i) => i.diagnostics || (i.details && i.details.text) || i.code).join(" ");
}

function appointments(bundle, mode) {
  return (bundle.entry || [])
    .filter((e) => e.resource.resourceType === "Appointment" && (!mode || (e.search && e.search.mode === mode)))
    .map((e) => e.resource);
}

function actor(appt, kind) {
  const p = (appt.participant || []).find((x) => x.actor && (x.actor.reference || "").split("/").slice(-2)[0] === kind);
  return p ? p.actor : null;
}

function actorName(appt, kind) {
  const a = actor(appt, kind);
  return a ? (a.display || a.reference) : "";
}

// Times are shown on the practice's own clock: the server writes them in the practice's offset.
function localDay(instant) { return instant.slice(0, 10); }
function localTime(instant) { return instant.slice(11, 16); }
function dayLabel(isoDay) {
  const d = new Date(isoDay + "T12:00:00Z");
  return d.toLocaleDateString("en-US", { weekday: "long", month: "long", day: "numeric", timeZone: "UTC" });
}

function say(text, ok) {
  const box = $("message");
  box.className = ok ? "ok" : "";
  box.textContent = text;
}

function patientRef() { return "Patient/" + $("patient").value.trim(); }

async function loadChoices() {
  try {
    const prac = await fhir("GET", "Practitioner", null, [["_count", "200"]]);
    const select = $("practitioner");
    for (const e of prac.entry || []) {
      const r = e.resource;
      if (r.resourceType !== "Practitioner") continue;
      const name = (r.name && r.name[0] && (r.name[0].text ||
        [(r.name[0].given || []).join(" "), r.name[0].family].join(" ").trim())) || r.id;
      select.add(new Option(name, "Practitioner/" + r.id));
    }
    // Specialties: whatever the server proposes over the next weeks (the public API has no list of them).
    const found = await fhir("POST", "Appointment/$find", {
      resourceType: "Parameters", parameter: [{ name: "_count", valueInteger: 500 }] });
    const seen = new Map();
    for (const a of appointments(found, "match")) {
      for (const s of a.specialty || []) {
        for (const c of s.coding || []) seen.set(c.system + "|" + c.code, c.display || s.text || c.code);
      }
    }
    for (const [token, label] of [...seen.entries()].sort((x, y) => x[1].localeCompare(y[1]))) {
      $("specialty").add(new Option(label, token));
    }
  } catch (err) {
    say("Could not load practitioners and specialties: " + err.message);
  }
}

async function findTimes(event) {
  event.preventDefault();
  say("");
  const start = $("week").value;
  const end = new Date(new Date(start + "T00:00:00Z").getTime() + 6 * 86400000).toISOString().slice(0, 10);
  const parameter = [
    { name: "start", valueDateTime: start }, { name: "end", valueDateTime: end },
    { name: "patient-reference", valueReference: { reference: patientRef() } },
    { name: "_count", valueInteger: 200 },
  ];
  if ($("specialty").value) parameter.push({ name: "specialty", valueString: $("specialty").value });
  if ($("practitioner").value) {
    parameter.push({ name: "practitioner", valueReference: { reference: $("practitioner").value } });
  }
  $("times-status").textContent = "Searching…";
  $("times").replaceChildren();
  try {
    const bundle = await fhir("POST", "Appointment/$find", { resourceType: "Parameters", parameter });
    showTimes(appointments(bundle, "match"), bundle.total);
  } catch (err) {
    $("times-status").textContent = "";
    say(err.message);
  }
}

function showTimes(list, total) {
  $("times-status").textContent = list.length
    ? `${list.length} times shown` + (total > list.length ? ` of ${total}` : "") + ". Choose one to hold it."
    : "No free times in that week.";
  const byDay = new Map();
  for (const a of list) {
    const day = localDay(a.start);
    if (!byDay.has(day)) byDay.set(day, []);
    byDay.get(day).push(a);
  }
  const container = $("times");
  for (const [day, appts] of [...byDay.entries()].sort()) {
    const group = document.createElement("div");
    group.className = "day";
    group.setAttribute("role", "group");
    const heading = document.createElement("h3");
    heading.id = "day-" + day;
    heading.textContent = dayLabel(day);
    group.setAttribute("aria-labelledby", heading.id);
    group.append(heading);
    for (const a of appts.sort((x, y) => x.start.localeCompare(y.start))) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "time";
      button.dataset.id = a.id;
      button.dataset.start = a.start;
      button.textContent = `${localTime(a.start)} ${actorName(a, "Practitioner")}`;
      button.setAttribute("aria-label", `${dayLabel(day)} ${localTime(a.start)} with ${actorName(a, "Practitioner")}` +
        ` at ${actorName(a, "Location")}`);
      button.addEventListener("click", () => hold(a, button));
      group.append(button);
    }
    container.append(group);
  }
}

async function hold(appt, button) {
  say("");
  try {
    const bundle = await fhir("POST", "Appointment/$hold", { resourceType: "Parameters", parameter: [
      { name: "appointment-reference", valueReference: { reference: "Appointment/" + appt.id } }] });
    held = appointments(bundle)[0];
    for (const other of document.querySelectorAll("button.time[aria-pressed=true]")) {
      other.setAttribute("aria-pressed", "false");
    }
    button.setAttribute("aria-pressed", "true");  // the held time stays visible, marked
    showHold();
  } catch (err) {
    say((err.status === 409 ? "Sorry, this time was just taken by someone else. " : "") + err.message);
    if (err.status === 409 || err.status === 404) button.remove();
  }
}

function showHold() {
  $("hold-panel").hidden = false;
  $("hold-summary").textContent = `${dayLabel(localDay(held.start))} at ${localTime(held.start)} with ` +
    `${actorName(held, "Practitioner")}, ${actorName(held, "Location")}`;
  const ext = (held.extension || []).find((e) => e.url === HOLD_EXPIRATION);
  const expires = ext ? new Date(ext.valueDateTime) : null;
  $("expiry").textContent = ext ? "until " + localTime(ext.valueDateTime) : "no expiry given";
  clearInterval(countdownTimer);
  const tick = () => {
    if (!expires) return;
    const left = Math.max(0, Math.round((expires.getTime() - Date.now()) / 1000));
    $("countdown").textContent = `${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}`;
    if (left === 0) {
      clearInterval(countdownTimer);
      say("The hold has expired; choose a time again.");
    }
  };
  tick();
  countdownTimer = setInterval(tick, 1000);
  $("book-button").focus();
}

async function book() {
  if (!held) return;
  const parameter = [{ name: "appointment-reference", valueReference: { reference: "Appointment/" + held.id } }];
  if ($("comment").value.trim()) parameter.push({ name: "comment", valueString: $("comment").value.trim() });
  try {
    const bundle = await fhir("POST", "Appointment/$book", { resourceType: "Parameters", parameter });
    const booked = appointments(bundle)[0];
    clearInterval(countdownTimer);
    held = null;
    $("hold-panel").hidden = true;
    say(`Booked: ${dayLabel(localDay(booked.start))} at ${localTime(booked.start)} with ` +
      `${actorName(booked, "Practitioner")}.`, true);
    const gone = document.querySelector(`button.time[data-id="${CSS.escape(parameter[0].valueReference.reference.slice(12))}"]`);
    if (gone) gone.remove();
    await loadMine();
  } catch (err) {
    say((err.status === 409 ? "Sorry, this time is no longer available. " : "") + err.message);
  }
}

async function loadMine() {
  if (!$("patient").value.trim()) return;
  const today = new Date().toISOString().slice(0, 10);
  try {
    const bundle = await fhir("GET", "Appointment", null, [
      ["patient", patientRef()], ["date", "ge" + today], ["status", "booked,pending"], ["_sort", "date"],
      ["_count", "100"]]);
    const list = appointments(bundle, "match");
    const body = $("mine").querySelector("tbody");
    body.replaceChildren();
    for (const a of list) {
      const row = body.insertRow();
      row.dataset.id = a.id;
      row.insertCell().textContent = `${dayLabel(localDay(a.start))} ${localTime(a.start)}`;
      row.insertCell().textContent = actorName(a, "Practitioner");
      row.insertCell().textContent = actorName(a, "Location");
      row.insertCell().textContent = a.status;
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Cancel";
      button.setAttribute("aria-label", `Cancel the appointment on ${dayLabel(localDay(a.start))} at ${localTime(a.start)}`);
      button.addEventListener("click", () => cancel(a));
      row.insertCell().append(button);
    }
    $("mine").hidden = list.length === 0;
    $("mine-status").textContent = list.length ? `${list.length} upcoming appointment(s).` : "No upcoming appointments.";
  } catch (err) {
    $("mine-status").textContent = "Could not load your appointments: " + err.message;
  }
}

async function cancel(appt) {
  const reason = { coding: [{ system: STATUS_REASON_SYSTEM, code: $("cancel-reason").value }] };
  const resource = {
    resourceType: "Appointment", id: appt.id, status: "cancelled", cancelationReason: reason,
    extension: [{ url: STATUS_REASON, valueCodeableConcept: reason }],
    participant: [{ actor: { reference: patientRef() }, status: "declined" }],
  };
  try {
    await fhir("POST", "Appointment/$book", { resourceType: "Parameters", parameter: [
      { name: "appointment-resource", resource }] });
    say(`Cancelled the appointment on ${dayLabel(localDay(appt.start))} at ${localTime(appt.start)}.`, true);
    await loadMine();
  } catch (err) {
    say(err.message);
  }
}

function init() {
  $("base").value = location.origin + "/fhir";
  const tomorrow = new Date(Date.now() + 86400000);
  $("week").value = tomorrow.toISOString().slice(0, 10);
  $("find-form").addEventListener("submit", findTimes);
  $("book-button").addEventListener("click", book);
  $("patient").addEventListener("change", loadMine);
  loadChoices();
}

init();
