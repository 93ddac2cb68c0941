// Box editor for BG2FG Sample, Extract Foreground and Decompose Layers: draw the region on the background.
//
// The node's `box` STRING widget ("x,y,w,h" in image pixels, "" = nothing drawn) is what is saved in the workflow and
// sent in the prompt; this editor hides it and shows, instead, the background reaching the node with the box on it
// (drag to draw, drag inside to move, drag a corner to resize) and the four numbers, editable. Plain JS, no build.
//
// Coordinates: the picture sits in a "frame" element with the image's aspect ratio; the box is placed in percent of
// the frame, and a pointer position is mapped back through the frame's on-screen rectangle. Both hold at any canvas
// zoom and node size, because the zoom only scales the frame as a whole.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const IMAGE_INPUT = { BFSBG2FGSample: "background", BFSExtractForeground: "background", BFSDecomposeLayers: "image" };
const MIN_HEIGHT = 220;
const NUMBERS = ["x", "y", "w", "h"];

const STYLE = `
.bfs-box-editor { display: flex; flex-direction: column; gap: 4px; width: 100%; height: 100%; box-sizing: border-box;
  pointer-events: auto; font: 12px sans-serif; color: var(--input-text, #ddd); }
.bfs-box-stage { position: relative; flex: 1 1 auto; min-height: 0; overflow: hidden; }
.bfs-box-frame { position: absolute; cursor: crosshair; touch-action: none; user-select: none; }
.bfs-box-frame img { width: 100%; height: 100%; display: block; pointer-events: none; }
.bfs-box-rect { position: absolute; box-sizing: border-box; border: 2px solid #ff3b30;
  background: rgba(255, 59, 48, 0.15); cursor: move; }
.bfs-box-rect.bfs-box-unused { border-style: dashed; opacity: 0.5; }
.bfs-box-handle { position: absolute; width: 10px; height: 10px; margin: -6px; background: #ff3b30;
  border: 1px solid #fff; }
.bfs-box-handle[data-corner="nw"] { left: 0; top: 0; cursor: nwse-resize; }
.bfs-box-handle[data-corner="ne"] { left: 100%; top: 0; cursor: nesw-resize; }
.bfs-box-handle[data-corner="sw"] { left: 0; top: 100%; cursor: nesw-resize; }
.bfs-box-handle[data-corner="se"] { left: 100%; top: 100%; cursor: nwse-resize; }
.bfs-box-note { flex: 0 0 auto; height: 1.4em; line-height: 1.4em; opacity: 0.8; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.bfs-box-numbers { flex: 0 0 auto; display: flex; gap: 4px; }
.bfs-box-numbers label { display: flex; flex: 1; gap: 2px; align-items: center; }
.bfs-box-numbers input { width: 100%; min-width: 0; background: var(--comfy-input-bg, #222);
  color: inherit; border: 1px solid #555; border-radius: 3px; }
`;

function addStyle() {
  if (document.getElementById("bfs-box-editor-style")) return;
  const style = document.createElement("style");
  style.id = "bfs-box-editor-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

// -- the box value -----------------------------------------------------------------------------------------------------
export function parseBox(text) {
  const parts = String(text ?? "").split(",").map((v) => v.trim());
  if (parts.length !== 4 || parts.some((v) => !/^-?\d+$/.test(v))) return null;
  const [x, y, w, h] = parts.map(Number);
  return { x, y, w, h };
}

const formatBox = (b) => (b ? `${b.x},${b.y},${b.w},${b.h}` : "");

function clampBox(b, width, height) {
  const x0 = Math.max(0, Math.min(b.x, width)), y0 = Math.max(0, Math.min(b.y, height));
  const x1 = Math.max(0, Math.min(b.x + b.w, width)), y1 = Math.max(0, Math.min(b.y + b.h, height));
  return { x: x0, y: y0, w: x1 - x0, h: y1 - y0 };
}

// -- where the background comes from -----------------------------------------------------------------------------------
function linkOf(graph, id) {
  if (id == null || !graph) return null;
  return graph.getLink?.(id) ?? (graph.links instanceof Map ? graph.links.get(id) : graph.links?.[id]) ?? null;
}

function viewURL(filename, type, subfolder = "") {
  const q = new URLSearchParams({ filename, type, subfolder });
  return api.apiURL(`/view?${q}`);
}

// An upstream Load Image's picture (through reroutes), else null.
function upstreamImageURL(node, inputName) {
  let target = node, slotName = inputName;
  for (let hops = 0; hops < 16; hops++) {
    const input = target.inputs?.find((i) => i.name === slotName) ?? (slotName == null ? target.inputs?.[0] : null);
    const link = linkOf(target.graph, input?.link);
    const origin = link && target.graph.getNodeById(link.origin_id);
    if (!origin) return null;
    if (origin.type === "Reroute") { target = origin; slotName = null; continue; }
    const image = origin.widgets?.find((w) => w.name === "image");
    if (!["LoadImage", "LoadImageMask"].includes(origin.comfyClass ?? origin.type) || !image?.value) return null;
    let name = String(image.value), type = "input";
    const tagged = name.match(/^(.*) \[(input|output|temp)\]$/);
    if (tagged) [, name, type] = tagged;
    const cut = name.lastIndexOf("/");
    return cut < 0 ? viewURL(name, type) : viewURL(name.slice(cut + 1), type, name.slice(0, cut));
  }
  return null;
}

// -- the editor ----------------------------------------------------------------------------------------------------------
class BoxEditor {
  constructor(node, boxWidget, inputName) {
    this.node = node;
    this.boxWidget = boxWidget;
    this.inputName = inputName;
    this.size = null; // the picture's [width, height] once loaded
    this.src = null;
    this.lastRun = null; // the background the node saved on its last run (bfs_background)
    this.shown = undefined;
    this.drag = null;
    this.build();
  }

  build() {
    const el = (tag, cls, parent) => {
      const e = document.createElement(tag);
      if (cls) e.className = cls;
      parent?.appendChild(e);
      return e;
    };
    this.element = el("div", "bfs-box-editor");
    this.stage = el("div", "bfs-box-stage", this.element);
    this.frame = el("div", "bfs-box-frame", this.stage);
    this.img = el("img", null, this.frame);
    this.img.draggable = false;
    this.rect = el("div", "bfs-box-rect", this.frame);
    for (const corner of ["nw", "ne", "sw", "se"]) el("div", "bfs-box-handle", this.rect).dataset.corner = corner;
    this.note = el("div", "bfs-box-note", this.element);
    const row = el("div", "bfs-box-numbers", this.element);
    this.inputs = {};
    for (const key of NUMBERS) {
      const label = el("label", null, row);
      label.textContent = key;
      const input = el("input", null, label);
      Object.assign(input, { type: "number", step: 1 });
      input.dataset.key = key;
      input.addEventListener("change", () => this.fromNumbers());
      input.addEventListener("keydown", (e) => e.stopPropagation()); // keep canvas shortcuts (Delete) out of typing
      this.inputs[key] = input;
    }
    this.img.addEventListener("load", () => {
      this.size = [this.img.naturalWidth, this.img.naturalHeight];
      this.refresh(true);
    });
    this.img.addEventListener("error", () => {
      this.size = null;
      this.refresh(true);
    });
    this.frame.addEventListener("pointerdown", (e) => this.down(e));
    this.frame.addEventListener("pointermove", (e) => this.move(e));
    this.frame.addEventListener("pointerup", (e) => this.up(e));
    this.frame.addEventListener("pointercancel", (e) => this.up(e));
    new ResizeObserver(() => this.layout()).observe(this.stage);
  }

  get box() {
    return parseBox(this.boxWidget.value);
  }

  setBox(box) {
    const text = formatBox(box);
    if (text === this.boxWidget.value) return;
    this.boxWidget.value = text;
    this.boxWidget.callback?.(text);
    this.node.setDirtyCanvas?.(true, false);
    this.refresh();
  }

  maskConnected() {
    return this.node.inputs?.find((i) => i.name === "mask")?.link != null;
  }

  // Called on every canvas draw: follow the graph (a new Load Image choice, a connected mask, a loaded workflow).
  sync() {
    const src = upstreamImageURL(this.node, this.inputName) ?? this.lastRun;
    if (src !== this.src) {
      this.src = src;
      this.size = null;
      if (src) this.img.src = src;
      else this.img.removeAttribute("src");
    }
    this.refresh();
  }

  refresh(force = false) {
    const state = [this.boxWidget.value, this.size?.join("x"), this.maskConnected()].join("|");
    if (!force && state === this.shown) return;
    this.shown = state;
    const box = this.box;
    for (const key of NUMBERS) {
      if (document.activeElement !== this.inputs[key]) this.inputs[key].value = box ? box[key] : "";
    }
    this.stage.style.display = this.size ? "" : "none";
    // One line, always there: the picture keeps its place while the note changes (e.g. mid-drag).
    let note = "";
    if (this.maskConnected()) note = "Mask connected: the mask is the region, the box is not used.";
    else if (!this.size) note = "No background yet: choose a Load Image (or run once), or type the numbers.";
    else if (!box) note = "Drag on the picture to draw the region.";
    this.note.textContent = note;
    this.note.title = note;
    this.rect.classList.toggle("bfs-box-unused", this.maskConnected());
    this.layout();
  }

  // Fit the frame (the picture's aspect ratio) in the stage and place the box in percent of it.
  layout() {
    if (!this.size) return;
    const [w, h] = this.size;
    const sw = this.stage.clientWidth, sh = this.stage.clientHeight;
    const scale = Math.min(sw / w, sh / h) || 0;
    Object.assign(this.frame.style, {
      width: `${w * scale}px`,
      height: `${h * scale}px`,
      left: `${(sw - w * scale) / 2}px`,
      top: `${(sh - h * scale) / 2}px`,
    });
    const box = this.box;
    this.rect.style.display = box ? "" : "none";
    if (box) {
      Object.assign(this.rect.style, {
        left: `${(100 * box.x) / w}%`,
        top: `${(100 * box.y) / h}%`,
        width: `${(100 * box.w) / w}%`,
        height: `${(100 * box.h) / h}%`,
      });
    }
  }

  // Screen position -> image pixel (clamped to the picture).
  pixel(e) {
    const r = this.frame.getBoundingClientRect();
    const [w, h] = this.size;
    const px = Math.round(((e.clientX - r.left) / r.width) * w);
    const py = Math.round(((e.clientY - r.top) / r.height) * h);
    return [Math.max(0, Math.min(px, w)), Math.max(0, Math.min(py, h))];
  }

  down(e) {
    if (!this.size || e.button !== 0) return;
    e.preventDefault();
    e.stopPropagation();
    this.frame.setPointerCapture(e.pointerId);
    const [px, py] = this.pixel(e);
    const box = this.box;
    const corner = e.target.dataset?.corner;
    if (box && corner) {
      // The opposite corner stays put.
      const ax = corner.includes("w") ? box.x + box.w : box.x, ay = corner.includes("n") ? box.y + box.h : box.y;
      this.drag = { kind: "draw", ax, ay };
    } else if (box && e.target === this.rect) {
      this.drag = { kind: "move", px, py, box };
    } else {
      this.drag = { kind: "draw", ax: px, ay: py };
    }
  }

  move(e) {
    if (!this.drag) return;
    e.preventDefault();
    e.stopPropagation();
    const [px, py] = this.pixel(e);
    const [w, h] = this.size;
    const d = this.drag;
    if (d.kind === "move") {
      const x = Math.max(0, Math.min(d.box.x + px - d.px, w - d.box.w));
      const y = Math.max(0, Math.min(d.box.y + py - d.py, h - d.box.h));
      this.setBox({ x, y, w: d.box.w, h: d.box.h });
    } else {
      const x = Math.min(d.ax, px), y = Math.min(d.ay, py);
      const bw = Math.abs(px - d.ax), bh = Math.abs(py - d.ay);
      if (bw > 0 && bh > 0) this.setBox({ x, y, w: bw, h: bh });
    }
  }

  up(e) {
    if (!this.drag) return;
    e.stopPropagation();
    this.drag = null;
    if (this.frame.hasPointerCapture(e.pointerId)) this.frame.releasePointerCapture(e.pointerId);
  }

  fromNumbers() {
    const values = NUMBERS.map((k) => this.inputs[k].value.trim());
    if (values.every((v) => v === "")) return this.setBox(null);
    if (values.some((v) => v === "" || !Number.isFinite(Number(v)))) return; // wait for all four
    let box = Object.fromEntries(NUMBERS.map((k, i) => [k, Math.round(Number(values[i]))]));
    if (this.size && box.w > 0 && box.h > 0) box = clampBox(box, ...this.size);
    this.setBox(box); // an empty or outside box is kept as typed: the node then says what is wrong
  }
}

function attach(node) {
  const inputName = IMAGE_INPUT[node.comfyClass ?? node.type];
  const boxWidget = node.widgets?.find((w) => w.name === "box");
  if (!inputName || !boxWidget || node.bfsBoxEditor) return;
  addStyle();
  const editor = new BoxEditor(node, boxWidget, inputName);
  boxWidget.hidden = true; // the editor shows and edits it; it is still saved and sent
  const widget = node.addDOMWidget("box_editor", "bfs_box_editor", editor.element, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => MIN_HEIGHT,
    onDraw: () => editor.sync(),
  });
  widget.serialize = false;
  node.bfsBoxEditor = editor;
  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], min[0], 320), Math.max(node.size[1], min[1])]);
  editor.sync();
}

app.registerExtension({
  name: "bfs.BoxEditor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!(nodeData.name in IMAGE_INPUT)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const saved = output?.bfs_background?.[0];
      if (saved && this.bfsBoxEditor) {
        this.bfsBoxEditor.lastRun = viewURL(saved.filename, saved.type, saved.subfolder);
        this.bfsBoxEditor.sync();
      }
    };
  },
  nodeCreated(node) {
    attach(node);
  },
  loadedGraphNode(node) {
    // A saved workflow restores the node's size; make room for the editor when it was saved smaller.
    const min = node.bfsBoxEditor && node.computeSize();
    if (min && node.size[1] < min[1]) node.setSize([Math.max(node.size[0], min[0]), min[1]]);
  },
});
