// The ops console: the ERP flow's state, limits, pause/resume, dead letters and the audit, all
// through the ops API with the key entered once and kept for this tab (sessionStorage).
//
// Everything the server returns reaches the page through textContent or an attribute set by
// value, never as markup: an ERP's error body (kept in last_error) is whatever the ERP said.
"use strict";

(() => {
  const KEY_SLOT = "atp-ops-key";
  const STATUS_EVERY_MS = 1000;
  const AUDIT_EVERY_MS = 10000;
  const CALL_TIMEOUT_MS = 5000;
  const DL_PAGE = 20;
  const AUDIT_PAGE = 20;
  const LIMIT_FIELDS = ["rate_per_second", "burst", "max_concurrency"];

  const $ = (id) => document.getElementById(id);
  const state = {
    key: null,
    view: null,
    statusTimer: null,
    polling: false,
    pollSoon: false,
    auditTimer: null,
    lastOk: 0,
    limitsDirty: false,
    dlCursors: [null], // the `after` of each page seen; the last one is the page shown
    dlItems: new Map(),
    dlSelected: new Set(),
    dlKnownCount: null,
    auditCursors: [null],
    auditVersion: null,
    detailId: null,
  };

  // -- calls -----------------------------------------------------------------------------------

  class SignedOut extends Error {}

  // One call to the API: the JSON answer (or null), its status. 401 signs out (the key is no
  // longer accepted) and throws SignedOut so no caller goes on with a stale key.
  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${state.key}`, Accept: "application/json" };
    const init = { method, headers, cache: "no-store", signal: AbortSignal.timeout(CALL_TIMEOUT_MS) };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    let data = null;
    try {
      data = await resp.json();
    } catch {
      data = null;
    }
    if (resp.status === 401) {
      signOut("The gateway no longer accepts this key. Enter an ops key again.");
      throw new SignedOut();
    }
    return { status: resp.status, data };
  }

  // A problem body as one line: its detail, and its request id for the logs.
  function problemText(status, data) {
    if (data && typeof data === "object") {
      const detail = typeof data.detail === "string" ? data.detail : data.title || "";
      const rid = typeof data.request_id === "string" ? ` (request ${data.request_id})` : "";
      return `${status}: ${detail}${rid}`;
    }
    return `HTTP ${status}`;
  }

  function failureText(err) {
    if (err && err.name === "TimeoutError") return "the gateway did not answer in time";
    return "the gateway could not be reached";
  }

  // -- sign in / out -------------------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    const input = $("key");
    const key = input.value.trim();
    const error = $("key-error");
    if (!key) {
      error.textContent = "Enter the ops API key.";
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    $("sign-in").disabled = true;
    error.textContent = "";
    try {
      const resp = await fetch("/v1/ops/erp", {
        headers: { Authorization: `Bearer ${key}`, Accept: "application/json" },
        cache: "no-store",
        signal: AbortSignal.timeout(CALL_TIMEOUT_MS),
      });
      if (resp.status === 200) {
        sessionStorage.setItem(KEY_SLOT, key);
        input.value = "";
        input.removeAttribute("aria-invalid");
        start(key);
        render(await resp.json());
        return;
      }
      if (resp.status === 401) {
        error.textContent = "That key was not accepted (401). Check it and enter it again.";
      } else if (resp.status === 403) {
        error.textContent =
          "That key is valid but not an ops key (403). Enter a key with the ops role.";
      } else {
        error.textContent = `The gateway answered ${resp.status}. Try again in a moment.`;
      }
    } catch (err) {
      error.textContent = `Could not sign in: ${failureText(err)}.`;
    } finally {
      $("sign-in").disabled = false;
    }
    input.setAttribute("aria-invalid", "true");
    input.select();
    input.focus();
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY_SLOT);
    state.key = null;
    clearTimeout(state.statusTimer);
    clearTimeout(state.auditTimer);
    $("console").hidden = true;
    $("session").hidden = true;
    $("login").hidden = false;
    $("key-error").textContent = message || "";
    $("notice").textContent = "";
    $("key").focus();
  }

  function start(key) {
    state.key = key;
    state.view = null;
    state.limitsDirty = false;
    state.dlCursors = [null];
    state.dlSelected.clear();
    state.dlKnownCount = null;
    state.auditCursors = [null];
    state.auditVersion = null;
    $("login").hidden = true;
    $("console").hidden = false;
    $("session").hidden = false;
    $("main").focus();
    pollStatus();
    loadDeadLetters();
    pollAudit();
  }

  // -- status ----------------------------------------------------------------------------------

  // One polling chain at a time: a refresh asked for while a poll is in flight (after a pause,
  // a replay) runs right after it instead of starting a second chain.
  async function pollStatus() {
    if (state.polling) {
      state.pollSoon = true;
      return;
    }
    state.polling = true;
    clearTimeout(state.statusTimer);
    try {
      const { status, data } = await api("GET", "/v1/ops/erp");
      if (status === 200) {
        render(data);
        $("notice").textContent = "";
      } else {
        $("notice").textContent = `Status not refreshed: ${problemText(status, data)}`;
      }
    } catch (err) {
      if (!(err instanceof SignedOut)) {
        $("notice").textContent = `Status not refreshed: ${failureText(err)}. Retrying.`;
      }
    } finally {
      state.polling = false;
    }
    markStale();
    if (state.key) {
      state.statusTimer = setTimeout(pollStatus, state.pollSoon ? 0 : STATUS_EVERY_MS);
    }
    state.pollSoon = false;
  }

  function markStale() {
    if (!state.view) return;
    const age = (Date.now() - state.lastOk) / 1000;
    const el = $("state");
    if (age > 3) {
      el.classList.add("stale");
      el.textContent = `No fresh status for ${Math.round(age)} s (last seen: ${
        state.view.paused ? "paused" : "running"
      })`;
    }
  }

  const num = (value, digits = 0) =>
    Number(value).toLocaleString("en-US", {
      minimumFractionDigits: digits,
      maximumFractionDigits: digits,
    });

  function age(seconds) {
    if (seconds < 60) return `${num(seconds, 1)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
    return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
  }

  function render(view) {
    state.view = view;
    state.lastOk = Date.now();
    const el = $("state");
    el.classList.remove("stale");
    el.classList.toggle("paused", view.paused);
    el.textContent = view.paused
      ? "PAUSED: no orders are sent to the ERP"
      : "Running: orders are sent to the ERP";
    $("s-depth").textContent = num(view.buffer_depth);
    $("s-age").textContent = age(view.oldest_age_seconds);
    $("s-sent").textContent = `${num(view.sent_per_second, 1)} /s`;
    $("s-effective").textContent = `${num(view.effective_rate_per_second, 1)} /s`;
    $("s-rate").textContent = `${num(view.limits.rate_per_second, 1)} /s`;
    $("s-burst").textContent = num(view.limits.burst);
    $("s-concurrency").textContent = num(view.limits.max_concurrency);
    $("s-inflight").textContent = num(view.in_flight);
    $("s-breaker").textContent = view.breaker.replace("_", "-");
    $("s-breaker").classList.toggle("alert", view.breaker !== "closed");
    $("s-dead").textContent = num(view.dead_letters);
    $("s-dead").classList.toggle("alert", view.dead_letters > 0);
    $("s-version").textContent = String(view.version);
    $("s-updated").textContent = `Updated ${stamp(new Date(), false)} · every second`;
    // Never under the operator's hands: not while they edit a field, nor once they have.
    if (!state.limitsDirty && !$("limits-form").contains(document.activeElement)) {
      fillLimits(view.limits);
    }
    // Another tab or gateway changed something: the lists follow.
    if (state.dlKnownCount !== null && state.dlKnownCount !== view.dead_letters) loadDeadLetters();
    state.dlKnownCount = view.dead_letters;
    if (state.auditVersion !== null && state.auditVersion !== view.version) loadAudit();
    state.auditVersion = view.version;
  }

  // -- pause / resume --------------------------------------------------------------------------

  async function flowAction(action) {
    const out = $("flow-result");
    out.textContent = "";
    try {
      const { status, data } = await api("POST", `/v1/ops/erp/${action}`);
      if (status === 200) {
        render(data);
        out.textContent = action === "pause" ? "Writers paused." : "Writers resumed.";
        loadAudit();
      } else {
        out.textContent = `Not ${action === "pause" ? "paused" : "resumed"}: ${problemText(status, data)}`;
      }
    } catch (err) {
      if (!(err instanceof SignedOut)) out.textContent = `Not done: ${failureText(err)}.`;
    }
  }

  // -- limits ----------------------------------------------------------------------------------

  function fillLimits(limits) {
    for (const name of LIMIT_FIELDS) $(name).value = String(limits[name]);
  }

  function clearLimitErrors() {
    for (const name of LIMIT_FIELDS) {
      $(`${name}-error`).textContent = "";
      $(name).removeAttribute("aria-invalid");
    }
    $("limits-error").textContent = "";
  }

  // What was typed, as the server should see it: a number when it reads as one, else the text
  // itself, so the server's 422 names the field (the console does not second-guess its rules).
  function typed(name) {
    const text = $(name).value.trim();
    if (text !== "" && Number.isFinite(Number(text))) return Number(text);
    return text === "" ? null : text;
  }

  async function applyLimits(event) {
    event.preventDefault();
    clearLimitErrors();
    const out = $("limits-result");
    out.textContent = "";
    const body = {};
    for (const name of LIMIT_FIELDS) body[name] = typed(name);
    try {
      const { status, data } = await api("PUT", "/v1/ops/erp/limits", body);
      if (status === 200) {
        state.limitsDirty = false;
        render(data);
        out.textContent = `Limits applied (version ${data.version}).`;
        loadAudit();
        return;
      }
      if (status === 422 && data && Array.isArray(data.errors)) {
        showLimitErrors(data.errors);
        return;
      }
      $("limits-error").textContent = `Not applied: ${problemText(status, data)}`;
    } catch (err) {
      if (!(err instanceof SignedOut)) {
        $("limits-error").textContent = `Not applied: ${failureText(err)}.`;
      }
    }
  }

  function showLimitErrors(errors) {
    let first = null;
    const general = [];
    for (const item of errors) {
      const field = typeof item.field === "string" ? item.field : "";
      const message = typeof item.message === "string" ? item.message : "invalid";
      if (LIMIT_FIELDS.includes(field)) {
        $(`${field}-error`).textContent = message;
        $(field).setAttribute("aria-invalid", "true");
        first = first || $(field);
      } else {
        general.push(field ? `${field}: ${message}` : message);
      }
    }
    $("limits-error").textContent = general.length
      ? `Not applied: ${general.join("; ")}`
      : "Not applied: correct the marked field.";
    (first || $("rate_per_second")).focus();
  }

  // -- dead letters ----------------------------------------------------------------------------

  async function loadDeadLetters() {
    const after = state.dlCursors[state.dlCursors.length - 1];
    const query = `?limit=${DL_PAGE}` + (after === null ? "" : `&after=${after}`);
    try {
      const { status, data } = await api("GET", `/v1/ops/dead-letters${query}`);
      if (status !== 200) {
        $("dl-result").textContent = `List not loaded: ${problemText(status, data)}`;
        return;
      }
      if (data.items.length === 0 && state.dlCursors.length > 1) {
        state.dlCursors = [null]; // this page emptied (replayed): back to the first
        loadDeadLetters();
        return;
      }
      renderDeadLetters(data);
    } catch (err) {
      if (!(err instanceof SignedOut)) $("dl-result").textContent = `List not loaded: ${failureText(err)}.`;
    }
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.append(td);
    return td;
  }

  function button(text, label, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.setAttribute("aria-label", label);
    b.addEventListener("click", onClick);
    return b;
  }

  // Local time, 24-hour, date first: unambiguous at 3 a.m. in any locale.
  function stamp(date, withDate = true) {
    const two = (n) => String(n).padStart(2, "0");
    const time = `${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}`;
    if (!withDate) return time;
    return `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())} ${time}`;
  }

  function when(iso) {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : stamp(date);
  }

  function renderDeadLetters(page) {
    const body = $("dl-rows");
    const rows = [];
    state.dlItems = new Map();
    for (const item of page.items) {
      state.dlItems.set(item.order_id, item);
      const tr = document.createElement("tr");
      tr.dataset.orderId = item.order_id;
      const pick = document.createElement("input");
      pick.type = "checkbox";
      pick.checked = state.dlSelected.has(item.order_id);
      pick.setAttribute("aria-label", `Select order ${item.order_id}`);
      pick.addEventListener("change", () => {
        if (pick.checked) state.dlSelected.add(item.order_id);
        else state.dlSelected.delete(item.order_id);
        tr.classList.toggle("selected", pick.checked);
        updateSelection();
      });
      tr.classList.toggle("selected", pick.checked);
      cell(tr, "").append(pick);
      const order = cell(tr, item.order_id);
      const small = document.createElement("div");
      small.className = "muted";
      small.textContent = `reservation ${item.reservation_id}`;
      order.append(small);
      cell(tr, String(item.attempts), "num");
      const error = item.last_error || "";
      cell(tr, error.length > 160 ? `${error.slice(0, 160)}…` : error, "err");
      cell(tr, when(item.updated_at));
      const actions = document.createElement("div");
      actions.className = "actions";
      actions.append(
        button("Inspect", `Inspect order ${item.order_id}`, () => inspect(item.order_id)),
        button("Replay", `Replay order ${item.order_id}`, () => replay([item.order_id])),
      );
      cell(tr, "").append(actions);
      rows.push(tr);
    }
    body.replaceChildren(...rows);
    $("dl-empty").hidden = page.items.length > 0;
    $("dl-table").hidden = page.items.length === 0;
    const pageNo = state.dlCursors.length;
    state.dlNext = page.next;
    $("dl-next").disabled = page.next === null;
    $("dl-first").disabled = pageNo === 1;
    $("dl-page").textContent = page.items.length ? `Page ${pageNo}` : "";
    keepFocus($("dl-next"), $("dl-first"));
    if (state.detailId !== null) {
      const item = state.dlItems.get(state.detailId);
      if (item) showDetail(item);
      else if (pageNo === 1) closeDetail(false); // replayed (or on another page)
    }
    updateSelection();
  }

  function updateSelection() {
    const n = state.dlSelected.size;
    const b = $("dl-replay-selected");
    b.textContent = `Replay selected (${n})`;
    b.disabled = n === 0;
  }

  function inspect(orderId) {
    const item = state.dlItems.get(orderId);
    if (!item) return;
    showDetail(item);
    $("dl-detail-title").focus();
  }

  function showDetail(item) {
    state.detailId = item.order_id;
    $("dl-detail").hidden = false;
    $("dl-detail-title").textContent = `Dead letter ${item.order_id}`;
    $("d-order").textContent = item.order_id;
    $("d-reservation").textContent = item.reservation_id;
    $("d-attempts").textContent = String(item.attempts);
    $("d-created").textContent = when(item.created_at);
    $("d-updated").textContent = when(item.updated_at);
    $("d-error").textContent = item.last_error || "(none recorded)";
    $("d-lines").textContent = "loading…";
    $("d-payload").textContent = "loading…";
    loadPayload(item.order_id);
  }

  // The order itself comes from its own call: the list stays small however big orders are.
  async function loadPayload(orderId) {
    let shown;
    let lines = "";
    try {
      const { status, data } = await api("GET", `/v1/ops/dead-letters/${encodeURIComponent(orderId)}`);
      if (status === 200 && data) {
        shown = JSON.stringify(data.order, null, 2);
        lines = JSON.stringify(data.lines, null, 2);
      } else {
        shown = `not available: ${problemText(status, data)}`;
      }
    } catch (err) {
      if (err instanceof SignedOut) return;
      shown = `not available: ${err.message || err}`;
    }
    if (state.detailId !== orderId) return; // another one was opened meanwhile
    $("d-payload").textContent = shown;
    $("d-lines").textContent = lines || shown;
  }

  function closeDetail(moveFocus) {
    const id = state.detailId;
    state.detailId = null;
    $("dl-detail").hidden = true;
    if (moveFocus) {
      const row = [...$("dl-rows").children].find((tr) => tr.dataset.orderId === id);
      (row ? row.querySelector("button") : $("dl-refresh")).focus();
    }
  }

  // Asks before a replay: the orders go to the ERP again.
  function confirmReplay(text) {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.showModal();
      $("confirm-cancel").focus();
    });
  }

  // ids: the order ids to replay, or null for all of them.
  async function replay(ids) {
    const out = $("dl-result");
    const all = ids === null;
    const count = all ? state.view?.dead_letters ?? 0 : ids.length;
    const what = all
      ? `all dead letters (${num(count)} now)`
      : ids.length === 1
        ? `order ${ids[0]}`
        : `${ids.length} selected orders`;
    const ok = await confirmReplay(
      `Replay ${what}? They go back to the buffer, attempts from zero, and are sent to the ERP again.`,
    );
    if (!ok) {
      out.textContent = "Replay cancelled.";
      return;
    }
    out.textContent = "";
    try {
      const body = all ? { all: true } : { order_ids: ids };
      const { status, data } = await api("POST", "/v1/ops/dead-letters/replay", body);
      if (status !== 200) {
        out.textContent = `Not replayed: ${problemText(status, data)}`;
        return;
      }
      let text = `Replayed ${num(data.replayed)}.`;
      if (data.not_dead_letters.length) {
        text += ` Not dead letters (left alone): ${data.not_dead_letters.join(", ")}.`;
      }
      if (data.more) text += " More are left: replay all again.";
      out.textContent = text;
      for (const id of ids || [...state.dlSelected]) state.dlSelected.delete(id);
      if (state.detailId !== null && (all || ids.includes(state.detailId))) closeDetail(false);
      loadDeadLetters();
      loadAudit();
      pollStatus();
    } catch (err) {
      if (!(err instanceof SignedOut)) out.textContent = `Not replayed: ${failureText(err)}.`;
    }
  }

  // -- audit -----------------------------------------------------------------------------------

  function pollAudit() {
    clearTimeout(state.auditTimer);
    loadAudit();
    state.auditTimer = setTimeout(pollAudit, AUDIT_EVERY_MS);
  }

  async function loadAudit() {
    const before = state.auditCursors[state.auditCursors.length - 1];
    const query = `?limit=${AUDIT_PAGE}` + (before === null ? "" : `&before=${before}`);
    try {
      const { status, data } = await api("GET", `/v1/ops/audit${query}`);
      if (status === 200) renderAudit(data);
    } catch (err) {
      if (!(err instanceof SignedOut)) {
        // The status line already says when the gateway is unreachable.
      }
    }
  }

  const show = (value) => (typeof value === "string" ? value : JSON.stringify(value));

  // One line per change: "key: before → after" for settings, what was replayed for a replay.
  function describe(entry) {
    const { before, after } = entry;
    if (before && after && typeof before === "object" && typeof after === "object") {
      const keys = Object.keys(after).filter((k) => k !== "version" && show(before[k]) !== show(after[k]));
      if (keys.length === 0) return "no change";
      return keys.map((k) => `${k}: ${show(before[k])} → ${show(after[k])}`).join(", ");
    }
    if (after && typeof after === "object" && Array.isArray(after.replayed)) {
      const ids = after.replayed;
      const shown = ids.slice(0, 10).join(", ") + (ids.length > 10 ? ` and ${ids.length - 10} more` : "");
      let text = `${after.all ? "all: " : ""}${ids.length} replayed${ids.length ? ` (${shown})` : ""}`;
      if (Array.isArray(after.not_dead_letters) && after.not_dead_letters.length) {
        text += `; not dead letters: ${after.not_dead_letters.join(", ")}`;
      }
      return text;
    }
    return after === null || after === undefined ? "" : show(after);
  }

  function renderAudit(page) {
    const rows = page.items.map((entry) => {
      const tr = document.createElement("tr");
      cell(tr, when(entry.at));
      cell(tr, String(entry.action));
      cell(tr, describe(entry));
      cell(tr, String(entry.key_fingerprint)).title = "first 16 hex digits of the key's SHA-256";
      cell(tr, String(entry.request_id));
      return tr;
    });
    $("audit-rows").replaceChildren(...rows);
    $("audit-empty").hidden = rows.length > 0;
    $("audit-table").hidden = rows.length === 0;
    state.auditNext = page.next;
    $("audit-older").disabled = page.next === null;
    $("audit-newest").disabled = state.auditCursors.length === 1;
    keepFocus($("audit-older"), $("audit-newest"));
  }

  // A pager button disabled under the keyboard's focus would drop it to the page's top: hand it
  // to the other one.
  function keepFocus(one, other) {
    if (document.activeElement === one && one.disabled && !other.disabled) other.focus();
    else if (document.activeElement === other && other.disabled && !one.disabled) one.focus();
  }

  // -- wiring ----------------------------------------------------------------------------------

  function wire() {
    $("login-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut("Signed out. The key is forgotten."));
    $("pause").addEventListener("click", () => flowAction("pause"));
    $("resume").addEventListener("click", () => flowAction("resume"));
    $("limits-form").addEventListener("submit", applyLimits);
    $("limits-form").addEventListener("input", () => {
      state.limitsDirty = true;
    });
    $("limits-reset").addEventListener("click", () => {
      clearLimitErrors();
      $("limits-result").textContent = "";
      state.limitsDirty = false;
      if (state.view) fillLimits(state.view.limits);
    });
    $("dl-refresh").addEventListener("click", () => {
      $("dl-result").textContent = "";
      loadDeadLetters();
    });
    $("dl-replay-selected").addEventListener("click", () => replay([...state.dlSelected]));
    $("dl-replay-all").addEventListener("click", () => replay(null));
    $("dl-next").addEventListener("click", () => {
      if (state.dlNext === null || state.dlNext === undefined) return;
      state.dlCursors.push(state.dlNext);
      loadDeadLetters();
    });
    $("dl-first").addEventListener("click", () => {
      state.dlCursors = [null];
      loadDeadLetters();
    });
    $("d-close").addEventListener("click", () => closeDetail(true));
    $("d-replay").addEventListener("click", () => {
      if (state.detailId !== null) replay([state.detailId]);
    });
    $("audit-refresh").addEventListener("click", loadAudit);
    $("audit-older").addEventListener("click", () => {
      if (state.auditNext === null || state.auditNext === undefined) return;
      state.auditCursors.push(state.auditNext);
      loadAudit();
    });
    $("audit-newest").addEventListener("click", () => {
      state.auditCursors = [null];
      loadAudit();
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && !$("dl-detail").hidden && !$("confirm").open) closeDetail(true);
    });
  }

  wire();
  const saved = sessionStorage.getItem(KEY_SLOT);
  if (saved) start(saved);
  else $("key").focus();
})();
