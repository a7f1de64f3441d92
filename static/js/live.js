// Live updates over WebSockets: the model-server indicator (every page), the settings page's status card,
// the scan list and one scan's pages. Each socket starts with a full snapshot from the server and the
// page re-syncs from it on every (re)connect; events in between only keep it current.
// Model output is untrusted: events carry it, and it is only ever assigned with textContent here; the
// scan page shows it as HTML only as rendered and sanitized by the server (scan_page.js).
(function () {
  "use strict";

  const MAX_BACKOFF_MS = 30000;
  const FINAL_CODES = { 4401: "Signed out: reload the page to sign in again.", 4403: "Not allowed to watch this." };
  const SCAN_LABELS = {
    queued: "Queued", processing: "Processing", done: "Done", done_with_errors: "Done with errors",
    failed: "Failed", cancelled: "Cancelled",
  };
  const PAGE_LABELS = { pending: "Pending", running: "Running", done: "Done", failed: "Failed" };
  const FINISHED = ["done", "done_with_errors", "failed", "cancelled"];

  // Visible to tests and to curious people in the console.
  const live = (window.ocrsiteLive = {
    sockets: {},
    snapshots: 0,
    events: 0,
    // Ask every open socket for a fresh snapshot (also used by the browser tests).
    resync() {
      for (const state of Object.values(this.sockets)) {
        if (state.socket && state.socket.readyState === WebSocket.OPEN) state.socket.send(JSON.stringify({ type: "resync" }));
      }
    },
  });

  function field(root, name) {
    return root ? root.querySelector(`[data-field="${name}"]`) : null;
  }

  function setText(element, text) {
    if (element && element.textContent !== text) element.textContent = text;
  }

  function setStatusClass(element, status) {
    if (!element) return;
    for (const name of [...element.classList]) if (name.startsWith("status-")) element.classList.remove(name);
    element.classList.add(`status-${status}`);
  }

  function formatDuration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    seconds = Math.round(seconds);
    if (seconds < 60) return `${seconds} s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return `${minutes} min ${seconds % 60} s`;
    return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
  }

  // --- one reconnecting socket --------------------------------------------------------------------------

  function connect(name, path, onMessage) {
    let attempt = 0;
    const state = (live.sockets[name] = { open: false, connects: 0, closedWith: null, socket: null });

    function open() {
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      const socket = new WebSocket(`${scheme}://${location.host}${path}`);
      state.socket = socket;
      socket.addEventListener("open", () => {
        state.open = true;
        state.connects += 1;
      });
      socket.addEventListener("message", (event) => {
        let payload;
        try {
          payload = JSON.parse(event.data);
        } catch (error) {
          return;
        }
        if (payload.type && payload.type.endsWith("snapshot")) {
          attempt = 0; // a snapshot means the connection works: the next loss starts the backoff over
          live.snapshots += 1;
        } else {
          live.events += 1;
        }
        onMessage(payload);
      });
      socket.addEventListener("close", (event) => {
        state.open = false;
        state.closedWith = event.code;
        if (FINAL_CODES[event.code]) {
          document.dispatchEvent(new CustomEvent("ocrsite:live-final", { detail: { name, message: FINAL_CODES[event.code] } }));
          return;
        }
        const delay = Math.min(MAX_BACKOFF_MS, 500 * 2 ** attempt) * (0.75 + Math.random() * 0.5);
        attempt += 1;
        setTimeout(open, delay);
      });
    }
    open();
  }

  // --- the model server: header indicator and the settings page's card ---------------------------------

  // "stopped (idle)"; "starting: capturing CUDA graphs, 2 min 5 s" with the phase's time counted on here
  // from the status's phase_elapsed_s (the server's clock, so a browser's wrong clock does not matter).
  let shownStatus = null;
  let statusReceivedAt = 0;

  function stateText(status) {
    if (status.idle && status.state === "stopped") return "stopped (idle)";
    if (status.state === "starting" && status.phase_label) {
      const elapsed = (status.phase_elapsed_s || 0) + (performance.now() - statusReceivedAt) / 1000;
      return `starting: ${status.phase_label}, ${formatDuration(elapsed)}`;
    }
    return status.state;
  }

  function showServerState(status) {
    const text = stateText(status);
    const indicator = document.getElementById("server-indicator");
    if (indicator) {
      setText(field(indicator, "state"), `model server: ${text}`);
      indicator.title = status.last_error ? `Model server: ${text} — ${status.last_error}` : `Model server: ${text}`;
    }
    const card = document.getElementById("server-status");
    setText(field(card, "state"), text);
    const phase = field(card, "phase");
    if (phase) setText(phase, status.phase_label ? `${status.phase_label} (${formatDuration((status.phase_elapsed_s || 0) + (performance.now() - statusReceivedAt) / 1000)})` : "—");
  }

  setInterval(() => {
    if (shownStatus && shownStatus.state === "starting" && shownStatus.phase_label) showServerState(shownStatus);
  }, 1000);

  function applyServerStatus(status) {
    document.dispatchEvent(new CustomEvent("server-status", { detail: status }));
    shownStatus = status;
    statusReceivedAt = performance.now();
    const indicator = document.getElementById("server-indicator");
    if (indicator) {
      indicator.dataset.state = status.state;
      indicator.dataset.idle = status.idle ? "true" : "false";
    }
    showServerState(status);
    const card = document.getElementById("server-status");
    if (!card) return;
    card.dataset.state = status.state;
    card.dataset.phase = status.phase || "";
    const state = field(card, "state");
    setStatusClass(state, status.state);
    if (status.model) setText(field(card, "model"), status.model);
    if (status.base_url) setText(field(card, "base_url"), status.base_url);
    const pid = field(card, "pid");
    setText(pid, status.pid === null ? "—" : String(status.pid));
    if (pid) pid.dataset.pid = status.pid === null ? "" : String(status.pid);
    setText(field(card, "restart_count"), String(status.restart_count));
    setText(field(card, "uptime_s"), formatDuration(status.uptime_s));
    setText(
      field(card, "last_health_check"),
      status.last_health_check ? new Date(status.last_health_check).toLocaleString() : "—",
    );
    const lastError = field(card, "last_error");
    setText(lastError, status.last_error || "—");
    if (lastError) lastError.classList.toggle("error", Boolean(status.last_error));
    const log = field(card, "log_tail");
    if (log) {
      setText(log, status.log_tail.join("\n"));
      log.hidden = status.log_tail.length === 0;
      log.scrollTop = log.scrollHeight;
    }
  }

  // --- one scan -----------------------------------------------------------------------------------------

  function scanPage(root) {
    const scanId = root.dataset.scanId;
    const list = document.getElementById("pages");

    function pageElement(number) {
      let item = document.getElementById(`page-${number}`);
      if (item) return item;
      // Normally rendered by the server; built here only if the snapshot knows a page the HTML did not.
      item = document.createElement("li");
      item.id = `page-${number}`;
      item.className = "page";
      item.dataset.page = String(number);
      item.dataset.loaded = "0";
      item.tabIndex = -1;
      const body = document.createElement("div");
      body.className = "page-body";
      body.dataset.field = "body";
      const title = document.createElement("h2");
      title.className = "page-title";
      title.textContent = `Page ${number}`;
      const status = document.createElement("span");
      status.className = "status";
      status.dataset.field = "status";
      body.append(title, status);
      item.append(body);
      list.appendChild(item);
      return item;
    }

    // The page's status changes here at once; its text, warnings and correction are HTML rendered (and
    // sanitized) by the server, which scan_page.js fetches when the page's `rev` says they changed.
    function applyPage(page) {
      const item = pageElement(page.number);
      item.dataset.status = page.status;
      setStatusClass(item, page.status);
      const status = field(item, "status");
      setText(status, PAGE_LABELS[page.status] || page.status);
      setStatusClass(status, page.status);
      item.dispatchEvent(new CustomEvent("ocrsite:page", { bubbles: true, detail: page }));
    }

    // Screen readers hear the scan's progress: every status change, and the pages done at most every 15 s.
    const announced = { status: root.dataset.status, done: null, at: 0 };
    function announce(totals) {
      const now = Date.now();
      const changed = totals.status !== announced.status;
      if (!changed && (totals.done === announced.done || now - announced.at < 15000)) return;
      if (announced.done === null && !changed) {
        announced.done = totals.done; // the page was loaded with these numbers: nothing new to say
        return;
      }
      let text = `${SCAN_LABELS[totals.status] || totals.status}: ${totals.done} of ${totals.total} pages done`;
      if (totals.failed) text += `, ${totals.failed} failed`;
      setText(field(root, "announce"), `${text}.`);
      Object.assign(announced, { status: totals.status, done: totals.done, at: now });
    }

    function applyScanStatus(status, label) {
      root.dataset.status = status;
      const element = field(root, "status");
      setText(element, label || SCAN_LABELS[status] || status);
      setStatusClass(element, status);
    }

    function applyTotals(totals) {
      applyScanStatus(totals.status);
      const bar = field(root, "progress");
      if (bar) {
        bar.max = totals.total;
        bar.value = totals.done;
      }
      let counts = `${totals.done}/${totals.total} done`;
      if (totals.failed) counts += `, ${totals.failed} failed`;
      if (totals.fallback) counts += `, ${totals.fallback} from the text layer`;
      setText(field(root, "counts"), counts);
      let rate = "";
      if (!FINISHED.includes(totals.status)) {
        if (totals.pages_per_s) rate = `${totals.pages_per_s.toFixed(2)} pages/s`;
        if (totals.eta_s !== null && totals.eta_s > 0) rate += `${rate ? " · " : ""}about ${formatDuration(totals.eta_s)} left`;
      }
      setText(field(root, "rate"), rate);
      const waiting = field(root, "waiting");
      if (waiting) waiting.hidden = !totals.waiting_for_server;
      announce(totals);
      for (const form of root.querySelectorAll("[data-show-when]")) {
        const when = form.dataset.showWhen.split(" ");
        // Retry resends a finished scan's failed and never-sent pages (a scan that failed as a whole has only the latter).
        const retryable = FINISHED.includes(totals.status) && totals.failed + totals.pending + totals.running > 0;
        form.hidden = !(when.includes(totals.status) || (when.includes("retryable") && retryable));
      }
    }

    connect("scan", `/ws/scans/${scanId}/`, (payload) => {
      if (payload.type === "scan.snapshot") {
        applyScanStatus(payload.scan.status, payload.scan.status_label);
        const error = field(root, "error");
        setText(error, payload.scan.error);
        if (error) error.hidden = !payload.scan.error;
        payload.pages.forEach(applyPage);
        applyTotals(payload.totals);
      } else if (payload.type === "page.update") {
        applyPage(payload.page);
      } else if (payload.type === "scan.progress") {
        applyTotals(payload.totals);
      }
    });
  }

  // --- the scan list ------------------------------------------------------------------------------------

  function scanList(table) {
    const body = table.tBodies[0];
    const withOwner = table.tHead && table.tHead.rows[0].cells.length > 4;

    function cell(row) {
      const td = document.createElement("td");
      row.appendChild(td);
      return td;
    }

    function buildRow(item) {
      const row = document.createElement("tr");
      row.dataset.scanId = String(item.id);
      const link = document.createElement("a");
      link.href = item.url;
      link.textContent = item.filename;
      cell(row).appendChild(link);
      if (withOwner) cell(row).textContent = item.owner;
      const status = document.createElement("span");
      status.className = "status";
      status.dataset.field = "status";
      const waiting = document.createElement("small");
      waiting.dataset.field = "waiting";
      waiting.textContent = "waiting for the model server";
      cell(row).append(status, " ", waiting);
      const pages = cell(row);
      const bar = document.createElement("progress");
      bar.dataset.field = "progress";
      const counts = document.createElement("span");
      counts.dataset.field = "pages";
      pages.append(bar, " ", counts);
      const time = document.createElement("time");
      time.dateTime = item.created_at;
      time.textContent = new Date(item.created_at).toLocaleString();
      cell(row).appendChild(time);
      return row;
    }

    function upsert(item, position) {
      let row = body.querySelector(`tr[data-scan-id="${item.id}"]`);
      if (!row) {
        row = buildRow(item);
        const empty = body.querySelector("tr.empty");
        if (empty) empty.remove();
        body.insertBefore(row, position === "top" ? body.firstChild : null);
      }
      row.dataset.status = item.status;
      const status = field(row, "status");
      setText(status, item.status_label);
      setStatusClass(status, item.status);
      field(row, "waiting").hidden = !item.waiting_for_server;
      const bar = field(row, "progress");
      if (bar) {
        bar.max = item.page_count;
        bar.value = item.done;
      }
      setText(field(row, "pages"), `${item.done}/${item.page_count}`);
      let failed = field(row, "failed");
      if (item.failed && !failed) {
        failed = document.createElement("span");
        failed.className = "error";
        failed.dataset.field = "failed";
        field(row, "pages").after(" ", failed);
      }
      if (failed) {
        setText(failed, item.failed ? `${item.failed} failed` : "");
        failed.hidden = !item.failed;
      }
      return row;
    }

    connect("scans", "/ws/scans/", (payload) => {
      if (payload.type === "scans.snapshot") {
        const keep = new Set(payload.scans.map((item) => String(item.id)));
        for (const row of body.querySelectorAll("tr[data-scan-id]")) if (!keep.has(row.dataset.scanId)) row.remove();
        payload.scans.forEach((item) => upsert(item, "bottom"));
        // Newest first, as the server renders it.
        payload.scans.forEach((item) => body.appendChild(body.querySelector(`tr[data-scan-id="${item.id}"]`)));
      } else if (payload.type === "scans.list_item") {
        upsert(payload.scan, "top");
      }
    });
  }

  // --- wiring -------------------------------------------------------------------------------------------

  function start() {
    if (document.getElementById("server-indicator") || document.getElementById("server-status")) {
      connect("server", "/ws/server/", (payload) => {
        if (payload.type === "server.snapshot" || payload.type === "server.status") applyServerStatus(payload.status);
        else if (payload.type === "server.endpoints") document.dispatchEvent(new CustomEvent("server-endpoints", { detail: payload.endpoints }));
      });
    }
    const scan = document.getElementById("scan");
    if (scan && scan.dataset.scanId) scanPage(scan);
    const table = document.getElementById("scan-list");
    if (table) scanList(table);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
