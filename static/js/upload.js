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

  // The server refuses a larger upload before reading it (413), and a browser still sending may
  // show that as a reset connection: say it here instead.
  const form = document.getElementById("upload-form");
  const error = document.getElementById("upload-error");
  form.addEventListener("submit", (event) => {
    const maxFiles = Number(form.dataset.maxFiles);
    const maxMb = Number(form.dataset.maxMb);
    const totalMb = [...input.files].reduce((sum, file) => sum + file.size, 0) / 1024 / 1024;
    let problem = "";
    if (input.files.length > maxFiles) {
      problem = `You chose ${input.files.length} files; one upload takes at most ${maxFiles}.`;
    } else if (totalMb > maxMb) {
      problem = `The chosen files are ${totalMb.toFixed(1)} MB together; one upload takes at most ${maxMb} MB.`;
    }
    error.hidden = !problem;
    error.textContent = problem;
    if (problem) event.preventDefault();
  });
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
