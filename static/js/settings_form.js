// The settings form: show the options of the chosen mode (the server marks them for the saved mode; this
// follows the mode select live), and "Test connection" on the form as it is now, unsaved, which offers the
// models the server serves for the model field.
(function () {
  const form = document.getElementById("settings-form");
  if (!form) return;
  const modeSelect = form.elements.namedItem("mode");
  const names = { local: "Local", external: "External", builtin: "Built-in" };

  function chosenMode() {
    return (modeSelect && modeSelect.value) || form.dataset.automaticMode || "builtin";
  }

  function applies(element, mode) {
    return (element.dataset.modes || "").split(" ").includes(mode);
  }

  function showMode() {
    const mode = chosenMode();
    form.dataset.mode = mode;
    for (const section of form.querySelectorAll("fieldset.section[data-modes]")) {
      const used = applies(section, mode);
      section.classList.toggle("not-applicable", !used);
      const note = section.querySelector(":scope > .not-applicable-note");
      note.hidden = used;
      note.textContent = `Not used in ${names[mode] || mode} mode.`;
      section.querySelector(":scope > details.section-body").open = used;
    }
    for (const field of form.querySelectorAll(".field[data-modes]")) {
      const used = applies(field, mode);
      field.classList.toggle("not-applicable", !used);
      const note = field.querySelector(":scope > .not-applicable-note");
      if (note) {
        note.hidden = used;
        note.textContent = `Not used in ${names[mode] || mode} mode.`;
      }
    }
  }

  if (modeSelect) modeSelect.addEventListener("change", showMode);
  showMode();

  // --- Test connection --------------------------------------------------------------------------------------
  const button = document.getElementById("test-connection-button");
  const result = document.getElementById("test-connection-result");
  const pick = document.getElementById("served-model-pick");
  const select = document.getElementById("served-model-select");
  const datalist = document.getElementById("served-models");
  const modelInput = form.elements.namedItem("model");
  const servedNameInput = form.elements.namedItem("served_model_name");
  if (!button || !result) return;
  button.hidden = false;

  function offer(models) {
    datalist.replaceChildren(...models.map((name) => new Option(name, name)));
    select.replaceChildren(new Option("Choose a model…", ""), ...models.map((name) => new Option(name, name)));
    pick.hidden = models.length === 0;
  }

  select.addEventListener("change", () => {
    if (!select.value) return;
    modelInput.value = select.value;
    // Requests use the served name when one is set: it follows the pick.
    if (servedNameInput && servedNameInput.value) servedNameInput.value = select.value;
    modelInput.dispatchEvent(new Event("input", { bubbles: true }));
    result.textContent = `Model set to '${select.value}'. Save the settings to use it.`;
    result.className = "";
  });

  button.addEventListener("click", async () => {
    const csrf = form.elements.namedItem("csrfmiddlewaretoken");
    button.disabled = true;
    result.textContent = "Testing…";
    result.className = "";
    try {
      const response = await fetch(button.dataset.action, {
        method: "POST",
        body: new FormData(form),
        headers: { "X-CSRFToken": csrf ? csrf.value : "", Accept: "application/json" },
        credentials: "same-origin",
      });
      const answer = await response.json();
      result.textContent = answer.message;
      result.className = answer.ok ? "ok" : "error";
      offer(answer.models || []);
    } catch (error) {
      result.textContent = `The request failed: ${error}`;
      result.className = "error";
    } finally {
      button.disabled = false;
    }
  });
})();
