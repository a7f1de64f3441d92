// Start / Stop / Restart / Test connection on the settings page: POST, then show the server's answer.
// The status itself arrives over the WebSocket (live.js).
(function () {
  const controls = document.getElementById("server-controls");
  const result = document.getElementById("server-control-result");
  const csrf = document.querySelector("input[name=csrfmiddlewaretoken]");
  if (!controls || !csrf) return;
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
    } catch (error) {
      result.textContent = `The request failed: ${error}`;
      result.className = "error";
    } finally {
      controls.querySelectorAll("button").forEach((b) => (b.disabled = false));
    }
  });
})();
