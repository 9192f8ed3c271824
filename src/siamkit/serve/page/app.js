// The page at /: plain JavaScript over the server's JSON API (no build step, no libraries).
"use strict";

const $ = (id) => document.getElementById(id);

// Every request carries the API key typed into the page, if any (servers started with --api-keys need one).
function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

// POST a form to the API; the JSON answer, or an Error carrying the server's one-line message.
async function post(path, form) {
  const response = await fetch(path, { method: "POST", body: form, headers: headers() });
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    throw new Error(`${path}: HTTP ${response.status} (not a JSON answer)`);
  }
  if (!response.ok) {
    throw new Error(body.error || body.detail || `${path}: HTTP ${response.status}`);
  }
  return body;
}

function firstFile(id, what) {
  const file = $(id).files[0];
  if (!file) throw new Error(`pick ${what} first`);
  return file;
}

function galleryPath(action) {
  const gallery = $("gallery-name").value.trim();
  if (!gallery) throw new Error("name a gallery first");
  return `v1/galleries/${encodeURIComponent(gallery)}/${action}`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// Run an action behind a button: disabled while it runs, its error shown on the page.
function onClick(buttonId, action) {
  const button = $(buttonId);
  button.addEventListener("click", async () => {
    button.disabled = true;
    showError("");
    try {
      await action();
    } catch (e) {
      showError(e.message);
    } finally {
      button.disabled = false;
    }
  });
}

async function verify() {
  const form = new FormData();
  form.append("image1", firstFile("image1", "photo 1"));
  form.append("image2", firstFile("image2", "photo 2"));
  const answer = await post("v1/verify?return_faces=true", form);
  ["face1", "face2"].forEach((id, i) => {
    $(id).src = `data:image/png;base64,${answer.faces[i]}`;
    $(id).hidden = false;
  });
  $("decision").textContent = answer.decision;
  $("decision").className = answer.decision === "same" ? "same" : "different";
  $("score").textContent = answer.score.toFixed(4);
  $("threshold").textContent = answer.threshold.toFixed(4);
  $("source").textContent = answer.source;
  $("verify-result").hidden = false;
}

async function enroll() {
  const name = $("enroll-name").value.trim();
  if (!name) throw new Error("type a name to enrol the photo under");
  const form = new FormData();
  form.append("identity", name);
  form.append("image", firstFile("enroll-image", "a photo to enrol"));
  const answer = await post(galleryPath("enroll"), form);
  $("enroll-result").textContent = `enrolled ${answer.image_ids.length} photo(s) of ${name}`;
}

async function identify() {
  const form = new FormData();
  form.append("image", firstFile("identify-image", "a photo to identify"));
  form.append("top_k", "5");
  const result = (await post(galleryPath("identify"), form)).results[0];
  $("identify-result").textContent = result.known
    ? `identified as ${result.identity}`
    : "unknown: no enrolled identity scores above the threshold";
  const rows = result.top_k.map((m) => {
    const row = document.createElement("tr");
    [m.identity, m.score.toFixed(4)].forEach((text) => {
      const cell = document.createElement("td");
      cell.textContent = text;  // names come from users: text, never HTML
      row.appendChild(cell);
    });
    return row;
  });
  $("identify-table").tBodies[0].replaceChildren(...rows);
  $("identify-table").hidden = rows.length === 0;
}

async function showModel() {
  try {
    const response = await fetch("readyz");
    const body = await response.json();
    $("model").textContent = body.model || "ready";
  } catch (e) {
    $("model").textContent = "(not answering)";
  }
}

onClick("verify-button", verify);
onClick("enroll-button", enroll);
onClick("identify-button", identify);
showModel();
