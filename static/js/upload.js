// Drag and drop onto the upload form's file input; the form itself is an ordinary POST.
(function () {
  const zone = document.getElementById("dropzone");
  const input = document.getElementById("files");
  const chosen = document.getElementById("chosen");
  if (!zone || !input) return;

  function listFiles() {
    chosen.replaceChildren();
    for (const file of input.files) {
      const item = document.createElement("li");
      item.textContent = `${file.name} (${(file.size / 1024 / 1024).toFixed(1)} MB)`;
      chosen.appendChild(item);
    }
  }
  input.addEventListener("change", listFiles);
  ["dragenter", "dragover"].forEach((name) =>
    zone.addEventListener(name, (event) => { event.preventDefault(); zone.classList.add("over"); }));
  ["dragleave", "drop"].forEach((name) =>
    zone.addEventListener(name, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    input.files = event.dataTransfer.files;
    listFiles();
  });
})();
