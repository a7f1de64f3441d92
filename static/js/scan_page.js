// The scan page: pages' text loaded as they scroll into view and refreshed when they change, the
// rendered/raw toggle, copy, zoom, keyboard navigation between pages and the jump-to-page control.
// Page HTML comes from the server, which renders Markdown and sanitizes it (scans.markup); nothing
// here turns text into HTML.
(function () {
  "use strict";

  const root = document.getElementById("scan");
  const list = document.getElementById("pages");
  if (!root || !list) return;
  const scanId = root.dataset.scanId;
  const announcer = root.querySelector('[data-field="announce"]');
  const requests = {}; // page number -> the latest request's token, so an older answer never wins

  function say(text) {
    if (!announcer) return;
    announcer.textContent = "";
    window.setTimeout(() => (announcer.textContent = text), 50);
  }

  // --- a page's text: loaded when it comes near the viewport, reloaded when it changes ---------------

  // An open form (edit, read again) or a focused control keeps its page as it is until it closes.
  function busy(item) {
    const body = item.querySelector('[data-field="body"]');
    if (!body) return false;
    if (body.querySelector("details.edit[open], details.read-again[open]")) return true;
    const active = document.activeElement;
    return Boolean(active && body.contains(active) && active.matches("input, select, textarea"));
  }

  function load(item) {
    const number = item.dataset.page;
    if (busy(item)) {
      item.dataset.stale = "1";
      return;
    }
    const token = (requests[number] || 0) + 1;
    requests[number] = token;
    item.dataset.loading = "1";
    fetch(`/scans/${scanId}/pages/${number}/`, { credentials: "same-origin", cache: "no-store" })
      .then((response) => (response.ok ? response.text() : Promise.reject(response.status)))
      .then((html) => {
        if (requests[number] !== token) return;
        if (busy(item)) {
          item.dataset.stale = "1";
          return;
        }
        const template = document.createElement("template");
        template.innerHTML = html; // the server's rendering: escaped text and sanitized Markdown
        const body = item.querySelector('[data-field="body"]');
        body.replaceChildren(template.content);
        const content = body.querySelector('[data-field="content"]');
        item.dataset.rev = content ? content.dataset.rev : "";
        item.dataset.loaded = "1";
        delete item.dataset.stale;
        showView(item);
      })
      .catch(() => {}) // the next change or scroll tries again
      .finally(() => {
        if (requests[number] === token) delete item.dataset.loading;
      });
  }

  const nearby = new IntersectionObserver(
    (entries) => {
      for (const entry of entries) {
        if (!entry.isIntersecting) continue;
        nearby.unobserve(entry.target);
        if (entry.target.dataset.loaded !== "1") load(entry.target);
      }
    },
    { rootMargin: "800px 0px" },
  );
  for (const item of list.querySelectorAll('li.page[data-loaded="0"]')) nearby.observe(item);

  list.addEventListener("ocrsite:page", (event) => {
    const item = event.target;
    if (item.dataset.loaded === "1") {
      if (item.dataset.rev !== event.detail.rev) load(item);
    } else if (!item.dataset.observed) {
      item.dataset.observed = "1";
      nearby.observe(item);
    }
  });

  // A closed form lets its page catch up with what changed meanwhile.
  list.addEventListener(
    "toggle",
    (event) => {
      const item = event.target.closest && event.target.closest("li.page");
      if (item && !event.target.open && item.dataset.stale) load(item);
    },
    true,
  );

  // --- rendered or raw, copy --------------------------------------------------------------------------

  function showView(item) {
    const raw = item.dataset.view === "raw";
    const rendered = item.querySelector('[data-field="html"]');
    const text = item.querySelector('[data-field="text"]');
    const button = item.querySelector('[data-action="raw"]');
    if (!rendered || !text || !button) return;
    rendered.hidden = raw;
    text.hidden = !raw;
    button.setAttribute("aria-pressed", String(raw));
    button.textContent = raw ? "Show rendered" : "Show raw Markdown";
  }

  async function copy(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    const area = document.createElement("textarea"); // plain HTTP: the clipboard API is not available
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    const copied = document.execCommand("copy");
    area.remove();
    if (!copied) throw new Error("copy refused");
  }

  list.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const item = button.closest("li.page");
    if (button.dataset.action === "raw") {
      item.dataset.view = item.dataset.view === "raw" ? "" : "raw";
      showView(item);
    } else if (button.dataset.action === "copy") {
      const text = item.querySelector('[data-field="text"]');
      copy(text ? text.textContent : "").then(
        () => {
          button.textContent = "Copied";
          say(`Page ${item.dataset.page}'s text was copied.`);
          window.setTimeout(() => (button.textContent = "Copy text"), 2000);
        },
        () => say("The text could not be copied: select it and copy it by hand."),
      );
    }
  });

  // --- zoom ---------------------------------------------------------------------------------------------

  const dialog = document.getElementById("zoom");
  const zoom = { scale: null }; // null: fit the page to the window; else pixels of the image per CSS pixel
  const part = (name) => dialog.querySelector(`[data-field="${name}"]`);

  function applyZoom() {
    const image = part("image");
    image.classList.toggle("fit", zoom.scale === null);
    image.style.width = zoom.scale === null ? "" : `${Math.round(image.naturalWidth * zoom.scale)}px`;
    const shown = zoom.scale === null ? image.clientWidth / (image.naturalWidth || 1) : zoom.scale;
    part("scale").textContent = image.naturalWidth ? `${Math.round(shown * 100)} %` : "";
  }

  function zoomBy(factor) {
    const image = part("image");
    const current = zoom.scale === null ? image.clientWidth / (image.naturalWidth || 1) : zoom.scale;
    zoom.scale = Math.min(4, Math.max(0.1, current * factor));
    applyZoom();
  }

  if (dialog) {
    list.addEventListener("click", (event) => {
      const link = event.target.closest("a.zoom-link");
      if (!link || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
      event.preventDefault();
      const image = part("image");
      zoom.scale = null;
      image.removeAttribute("src");
      image.alt = `Page ${link.dataset.page} at full resolution`;
      image.onload = applyZoom;
      image.src = link.href;
      part("title").textContent = `Page ${link.dataset.page}`;
      part("open").href = link.href;
      applyZoom(); // fitted from its first frame; the scale shows once the image has loaded
      dialog.showModal();
      part("area").focus();
    });
    dialog.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-zoom]");
      if (!button) return;
      const action = button.dataset.zoom;
      if (action === "close") dialog.close();
      else if (action === "in") zoomBy(1.5);
      else if (action === "out") zoomBy(1 / 1.5);
      else {
        zoom.scale = null;
        applyZoom();
      }
    });
    dialog.addEventListener("keydown", (event) => {
      if (event.ctrlKey || event.metaKey || event.altKey) return;
      if (event.key === "+" || event.key === "=") zoomBy(1.5);
      else if (event.key === "-") zoomBy(1 / 1.5);
      else if (event.key === "0") {
        zoom.scale = null;
        applyZoom();
      } else return;
      event.preventDefault();
    });
    // Drag to move around the zoomed page (touch screens scroll natively).
    const area = part("area");
    let drag = null;
    area.addEventListener("pointerdown", (event) => {
      if (event.pointerType !== "mouse" || event.button !== 0) return;
      drag = { x: event.clientX, y: event.clientY, left: area.scrollLeft, top: area.scrollTop };
      area.setPointerCapture(event.pointerId);
      event.preventDefault();
    });
    area.addEventListener("pointermove", (event) => {
      if (!drag) return;
      area.scrollLeft = drag.left - (event.clientX - drag.x);
      area.scrollTop = drag.top - (event.clientY - drag.y);
    });
    area.addEventListener("pointerup", () => (drag = null));
    area.addEventListener("pointercancel", () => (drag = null));
  }

  // --- moving between pages -------------------------------------------------------------------------

  const pages = () => [...list.querySelectorAll("li.page")];

  function goTo(item) {
    if (!item) return;
    item.scrollIntoView({ block: "start" });
    item.focus({ preventScroll: true });
    history.replaceState(null, "", `#${item.id}`);
  }

  // The page at the top of the window: the last one whose top has reached it.
  function currentIndex(items) {
    let index = 0;
    items.forEach((item, i) => {
      if (item.getBoundingClientRect().top <= 12) index = i;
    });
    return index;
  }

  document.addEventListener("keydown", (event) => {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey) return;
    if (dialog && dialog.open) return;
    if (event.target.closest && event.target.closest("input, textarea, select, [contenteditable]")) return;
    const items = pages();
    if (!items.length) return;
    const index = currentIndex(items);
    if (event.key === "j") {
      const first = items[0].getBoundingClientRect().top > 12;
      goTo(items[first ? 0 : Math.min(items.length - 1, index + 1)]);
    } else if (event.key === "k") {
      const partlyAbove = items[index].getBoundingClientRect().top < -12;
      goTo(items[partlyAbove ? index : Math.max(0, index - 1)]);
    } else if (event.key === "g") {
      const input = document.getElementById("jump-to");
      if (!input) return;
      input.focus();
      input.select();
    } else return;
    event.preventDefault();
  });

  const jump = document.getElementById("jump-form");
  if (jump) {
    jump.addEventListener("submit", (event) => {
      event.preventDefault();
      const number = Number(jump.elements.page.value);
      const item = document.getElementById(`page-${number}`);
      if (item) goTo(item);
    });
  }
})();
