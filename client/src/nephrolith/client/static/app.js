// Web page of the nephrolith inference API: uploads one file and shows the response.
// Plain JavaScript with no external resources. Server text is inserted with textContent only.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const STUDY_SUFFIXES = [".zip", ".nii", ".nii.gz"];
const SLICE_CAPTION =
  "Grad-CAM heatmap over the slice: warm colours mark the regions that drove the score.";

function byId(id) {
  return document.getElementById(id);
}

function isStudy(fileName) {
  const lower = fileName.toLowerCase();
  return STUDY_SUFFIXES.some((suffix) => lower.endsWith(suffix));
}

function setStatus(message, isError) {
  const status = byId("status");
  status.textContent = message;
  status.classList.toggle("error", Boolean(isError));
}

function svgElement(name, attributes) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) {
    element.setAttribute(key, String(value));
  }
  return element;
}

function showVerdict(label, value, threshold, classNames) {
  const verdict = byId("verdict");
  verdict.textContent = label;
  const positive = classNames && label === classNames[classNames.length - 1];
  verdict.className = positive ? "verdict-positive" : "verdict-negative";
  byId("probability").textContent = value.toFixed(3);
  byId("threshold").textContent = threshold.toFixed(3);
}

function showInput(input) {
  const parts = [input.kind, "shape " + input.shape.join(" x ")];
  parts.push(input.is_hu ? "Hounsfield units" : "display grey levels");
  if (input.spacing_mm) {
    parts.push("spacing " + input.spacing_mm.map((s) => s.toFixed(2)).join(" x ") + " mm");
  }
  byId("input-summary").textContent = parts.join(", ");
}

// Draws slice scores as a polyline with the threshold as a dashed line and the top slices as dots.
function drawCurve(scores, threshold, topSlices) {
  const svg = byId("curve");
  svg.replaceChildren();
  const width = 640, height = 220, left = 40, right = 10, top = 10, bottom = 30;
  const plotWidth = width - left - right, plotHeight = height - top - bottom;
  const x = (i) => left + (scores.length > 1 ? (i / (scores.length - 1)) * plotWidth : plotWidth / 2);
  const y = (p) => top + (1 - p) * plotHeight;

  svg.appendChild(svgElement("line", { class: "axis", x1: left, y1: top, x2: left, y2: top + plotHeight }));
  svg.appendChild(svgElement("line", { class: "axis", x1: left, y1: top + plotHeight, x2: left + plotWidth, y2: top + plotHeight }));
  for (const tick of [0, 0.5, 1]) {
    const label = svgElement("text", { x: 4, y: y(tick) + 4 });
    label.textContent = tick.toFixed(1);
    svg.appendChild(label);
  }
  const axisLabel = svgElement("text", { x: left + plotWidth / 2 - 40, y: height - 6 });
  axisLabel.textContent = "slice (0 to " + (scores.length - 1) + ")";
  svg.appendChild(axisLabel);

  svg.appendChild(svgElement("line", { class: "threshold-line", x1: left, y1: y(threshold), x2: left + plotWidth, y2: y(threshold) }));
  const points = scores.map((p, i) => x(i).toFixed(1) + "," + y(p).toFixed(1)).join(" ");
  svg.appendChild(svgElement("polyline", { class: "score-line", points: points }));
  for (const index of topSlices) {
    const dot = svgElement("circle", { class: "top-point", cx: x(index), cy: y(scores[index]), r: 3.5 });
    const title = svgElement("title", {});
    title.textContent = "slice " + index + ": " + scores[index].toFixed(3);
    dot.appendChild(title);
    svg.appendChild(dot);
  }
}

function showTopSlices(topSlices) {
  const gallery = byId("top-slices");
  gallery.replaceChildren();
  for (const item of topSlices) {
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.src = "data:image/png;base64," + item.heatmap_png;
    image.alt = "Heatmap of slice " + item.slice;
    const caption = document.createElement("figcaption");
    caption.textContent = "slice " + item.slice + ": " + item.score.toFixed(3);
    figure.append(image, caption);
    gallery.appendChild(figure);
  }
}

function formatNumber(value, digits) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function showCandidates(candidates) {
  const block = byId("candidates-block");
  const body = byId("candidates").querySelector("tbody");
  body.replaceChildren();
  block.hidden = candidates.length === 0;
  candidates.forEach((candidate, index) => {
    const row = document.createElement("tr");
    const cells = [
      String(index + 1),
      candidate.slice === null ? "-" : String(candidate.slice),
      formatNumber(candidate.row, 0),
      formatNumber(candidate.col, 0),
      formatNumber(candidate.size_mm, 1),
      formatNumber(candidate.peak_hu, 0),
      formatNumber(candidate.heat, 2),
    ];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    }
    body.appendChild(row);
  });
}

function showSlice(result) {
  byId("probability-label").textContent = "Probability";
  showVerdict(result.label, result.probability, result.threshold, result.class_names);
  showInput(result.input);
  byId("study").hidden = true;
  const figure = byId("heatmap-figure");
  figure.hidden = !result.heatmap_png;
  if (result.heatmap_png) {
    byId("heatmap").src = "data:image/png;base64," + result.heatmap_png;
    byId("heatmap-caption").textContent = SLICE_CAPTION;
  }
  showCandidates(result.candidates || []);
}

function showStudy(result) {
  byId("probability-label").textContent = "Study score (highest slice)";
  showVerdict(result.verdict, result.score, result.threshold, result.class_names);
  showInput(result.input);
  const figure = byId("heatmap-figure");
  figure.hidden = result.top_slices.length === 0;
  if (result.top_slices.length > 0) {
    const best = result.top_slices[0];
    byId("heatmap").src = "data:image/png;base64," + best.heatmap_png;
    byId("heatmap-caption").textContent = "Grad-CAM heatmap over slice " + best.slice +
      ", the highest-scoring slice: warm colours mark the regions that drove the score.";
  }
  byId("study").hidden = false;
  drawCurve(result.slice_scores, result.threshold, result.top_slices.map((item) => item.slice));
  showTopSlices(result.top_slices);
  showCandidates(result.candidates || []);
}

async function analyse(event) {
  event.preventDefault();
  const file = byId("file-input").files[0];
  if (!file) {
    setStatus("Choose a file first.", true);
    return;
  }
  const study = isStudy(file.name);
  const url = study ? "/v1/studies?top_k=3" : "/v1/predict?heatmap=1";
  const form = new FormData();
  form.append("file", file);

  const button = byId("submit-button");
  button.disabled = true;
  byId("result").hidden = true;
  setStatus(study ? "Analysing the study, slice by slice..." : "Analysing the slice...", false);
  try {
    const response = await fetch(url, { method: "POST", body: form });
    const result = await response.json().catch(() => ({ error: "the server sent a non-JSON response" }));
    if (!response.ok) {
      setStatus("Error " + response.status + ": " + (result.error || response.statusText), true);
      return;
    }
    if (study) {
      showStudy(result);
    } else {
      showSlice(result);
    }
    byId("result").hidden = false;
    setStatus("Done (request " + result.request_id + ").", false);
  } catch (error) {
    setStatus("The request failed: " + error.message + ". Check that the server is running.", true);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  byId("upload-form").addEventListener("submit", analyse);
});
