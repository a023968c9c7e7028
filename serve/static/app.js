"use strict";
// The demo page: send the chosen image to POST detect, draw the boxes on a canvas, list them.
(function () {
  const $ = (id) => document.getElementById(id);
  const COLOURS = ["#e6194b", "#3cb44b", "#0082c8", "#f58230", "#911eb4", "#46f0f0"];
  const status = (text, state) => { $("status").textContent = text; $("status").dataset.state = state; };

  fetch("readyz").then((r) => r.json()).then((info) => {
    $("model").textContent = info.ready
      ? `${info.model} on ${info.backend} (${info.provider}), classes: ${info.classes.join(", ")}`
      : `model not ready: ${info.reason}`;
  }).catch(() => { $("model").textContent = "model information unavailable"; });

  $("conf").addEventListener("input", () => { $("conf-value").textContent = $("conf").value; });

  function loadImage(file) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the browser cannot show this image"));
      img.src = URL.createObjectURL(file);
    });
  }

  function drawResult(img, result) {
    const canvas = $("canvas");
    canvas.width = result.width;
    canvas.height = result.height;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0, result.width, result.height);
    const line = Math.max(2, Math.round(Math.max(result.width, result.height) / 300));
    ctx.lineWidth = line;
    ctx.font = `${Math.max(12, line * 6)}px sans-serif`;
    const rows = $("detections").querySelector("tbody");
    rows.textContent = "";
    result.detections.forEach((d, i) => {
      const [x1, y1, x2, y2] = d.box;
      const colour = COLOURS[d.class_id % COLOURS.length];
      ctx.strokeStyle = colour;
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      const label = `${d.class_name} ${d.score.toFixed(2)}`;
      const h = Math.max(12, line * 6) + 4;
      ctx.fillStyle = colour;
      ctx.fillRect(x1, Math.max(0, y1 - h), ctx.measureText(label).width + 6, h);
      ctx.fillStyle = "#fff";
      ctx.fillText(label, x1 + 3, Math.max(h - 4, y1 - 4));
      const tr = document.createElement("tr");
      tr.className = "detection";
      for (const text of [String(i + 1), d.class_name, d.score.toFixed(3), d.box.map((v) => v.toFixed(1)).join(", ")]) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.appendChild(td);
      }
      rows.appendChild(tr);
    });
    $("detections").hidden = result.detections.length === 0;
  }

  $("form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = $("file").files[0];
    if (!file) { status("Choose an image first.", "error"); return; }
    $("submit").disabled = true;
    status("Detecting…", "busy");
    try {
      const body = new FormData();
      body.append("images", file, file.name);
      const headers = { Accept: "application/json" };
      if ($("key").value) headers["X-API-Key"] = $("key").value;
      const params = new URLSearchParams({ conf: $("conf").value });
      const response = await fetch(`detect?${params}`, { method: "POST", body, headers });
      const answer = await response.json();
      if (!response.ok) throw new Error(`${response.status}: ${answer.detail}`);
      const result = answer.images[0];
      drawResult(await loadImage(file), result);
      const n = result.detections.length;
      status(`${n} detection${n === 1 ? "" : "s"} in ${answer.timings.total_ms.toFixed(0)} ms ` +
        `(${result.width}x${result.height} ${result.format})`, "done");
      $("status").dataset.count = String(n);
    } catch (err) {
      status(`Error ${err.message}`, "error");
    } finally {
      $("submit").disabled = false;
    }
  });
})();
