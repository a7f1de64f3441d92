// Start / Stop / Restart / Test connection on the settings page: POST, then show the server's answer.
// The status itself arrives over the WebSocket (live.js).
(function () {
  const controls = document.getElementById("server-controls");
  const result = document.getElementById("server-control-result");
  const csrf = document.querySelector("input[name=csrfmiddlewaretoken]");
  if (!controls || !csrf) return;
  // After Start or Restart, the answer only says the request was taken; what the server did next arrives
  // with the live status, and replaces the answer once the start is over one way or the other.
  let starting = false;
  document.addEventListener("server-status", (event) => {
    const status = event.detail;
    if (!starting || !["ready", "failed", "stopped"].includes(status.state)) return;
    starting = false;
    result.textContent = status.state === "ready" ? "The vLLM server is ready." : `The vLLM server did not start: ${status.last_error || status.state}`;
    result.className = status.state === "ready" ? "" : "error";
  });
  controls.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    controls.querySelectorAll("button").forEach((b) => (b.disabled = true));
    result.textContent = "…";
    try {
      const response = await fetch(button.dataset.action, {
        method: "POST",
        headers: { "X-CSRFToken": csrf.value, Accept: "application/json" },
        credentials: "same-origin",
      });
      const answer = await response.json();
      result.textContent = answer.message;
      result.className = answer.ok ? "" : "error";
      starting = answer.ok && button.dataset.kind === "start";
    } catch (error) {
      result.textContent = `The request failed: ${error}`;
      result.className = "error";
    } finally {
      controls.querySelectorAll("button").forEach((b) => (b.disabled = false));
    }
  });
})();
