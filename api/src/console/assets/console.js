// sluice console: the few things a page cannot do without a script. Every page works
// without it, except the upload's progress bar.
(function () {
  "use strict";
  const root = document.documentElement;
  const saved = localStorage.getItem("sluice-theme");
  if (saved === "light" || saved === "dark") root.dataset.theme = saved;

  function dark() {
    if (root.dataset.theme) return root.dataset.theme === "dark";
    return window.matchMedia("(prefers-color-scheme: dark)").matches;
  }

  document.addEventListener("DOMContentLoaded", function () {
    for (const b of document.querySelectorAll("[data-theme-toggle]")) {
      b.setAttribute("aria-pressed", String(dark()));
      b.addEventListener("click", function () {
        const next = dark() ? "light" : "dark";
        root.dataset.theme = next;
        localStorage.setItem("sluice-theme", next);
        b.setAttribute("aria-pressed", String(next === "dark"));
      });
    }

    // Select every row of a table.
    for (const all of document.querySelectorAll("[data-select-all]")) {
      all.addEventListener("change", function () {
        const form = all.closest("form");
        for (const box of form.querySelectorAll('input[type="checkbox"][name="' + all.dataset.selectAll + '"]')) {
          box.checked = all.checked;
        }
      });
    }

    // A running run's counts, polled from the API with this session.
    const live = document.querySelector("[data-live-run]");
    if (live) {
      const id = live.dataset.liveRun;
      const tick = async function () {
        try {
          const r = await fetch("/v1/runs/" + encodeURIComponent(id), { headers: { Accept: "application/json" } });
          if (r.ok) {
            const run = await r.json();
            // A queued run's page waits for it to start.
            if (live.hasAttribute("data-waiting")) {
              if (run.status !== "queued") { window.location.reload(); return; }
              setTimeout(tick, 1000);
              return;
            }
            for (const cell of live.querySelectorAll("[data-field]")) {
              const k = cell.dataset.field;
              if (k !== "status" && run[k] !== undefined && run[k] !== null) cell.textContent = String(run[k]);
            }
            if (run.status !== "running") { window.location.reload(); return; }
          }
        } catch (e) { /* the next tick tries again */ }
        setTimeout(tick, 1000);
      };
      setTimeout(tick, 1000);
    }

    // Upload with progress, then open the run.
    const form = document.getElementById("upload");
    if (form) {
      const input = form.querySelector('input[type="file"]');
      const drop = form.querySelector("[data-drop]");
      const bar = document.getElementById("upload-progress");
      const status = document.getElementById("upload-status");
      drop.addEventListener("dragover", function (e) { e.preventDefault(); drop.classList.add("over"); });
      drop.addEventListener("dragleave", function () { drop.classList.remove("over"); });
      drop.addEventListener("drop", function (e) {
        e.preventDefault();
        drop.classList.remove("over");
        if (e.dataTransfer.files.length) input.files = e.dataTransfer.files;
      });
      form.addEventListener("submit", function (e) {
        e.preventDefault();
        const file = input.files[0];
        if (!file) { status.textContent = "Choose a file first."; return; }
        const pipeline = form.querySelector("select[name=pipeline]").value;
        const body = new FormData();
        body.append("file", file, file.name);
        const xhr = new XMLHttpRequest();
        xhr.open("POST", "/v1/pipelines/" + encodeURIComponent(pipeline) + "/files");
        xhr.setRequestHeader("X-CSRF-Token", form.dataset.csrf);
        bar.hidden = false;
        bar.value = 0;
        status.textContent = "Uploading " + file.name + "…";
        xhr.upload.addEventListener("progress", function (ev) {
          if (ev.lengthComputable) {
            bar.value = Math.round((ev.loaded / ev.total) * 100);
            status.textContent = "Uploading " + file.name + ": " + bar.value + "%";
          }
        });
        xhr.addEventListener("load", function () {
          let answer = {};
          try { answer = JSON.parse(xhr.responseText); } catch (err) { answer = {}; }
          if (xhr.status >= 200 && xhr.status < 300 && answer.run_id) {
            bar.value = 100;
            status.textContent = "Uploaded. Opening its run…";
            window.location.assign("/runs/" + encodeURIComponent(answer.run_id));
          } else {
            status.textContent = "The upload was refused: " + (answer.detail || xhr.status);
            status.className = "problem";
          }
        });
        xhr.addEventListener("error", function () { status.textContent = "The upload failed: the connection broke."; status.className = "problem"; });
        xhr.send(body);
      });
    }
  });
})();
