// Loss curves on uPlot (vendored): several series over training steps, with exponential smoothing (debiased,
// as TensorBoard does) and a log-scale toggle. Points can be added while a job trains.

import { h } from "./dom.js";

export const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];

export function smooth(values, weight) {
  if (!weight) return values.slice();
  let last = 0;
  let count = 0;
  return values.map((value) => {
    if (value === null || value === undefined || !Number.isFinite(value)) return null;
    count += 1;
    last = last * weight + (1 - weight) * value;
    return last / (1 - weight ** count);
  });
}

// Controls (smoothing slider, log-scale checkbox) bound to one or more charts.
export function chartControls(onChange) {
  const slider = h("input", { type: "range", min: 0, max: 0.99, step: 0.01, value: 0.6, id: "smoothing" });
  const value = h("output", { for: "smoothing" }, "0.60");
  const log = h("input", { type: "checkbox", id: "log-scale" });
  const state = { smoothing: 0.6, log: false };
  slider.addEventListener("input", () => {
    state.smoothing = Number(slider.value);
    value.textContent = state.smoothing.toFixed(2);
    onChange(state);
  });
  log.addEventListener("change", () => {
    state.log = log.checked;
    onChange(state);
  });
  const element = h(
    "div",
    { class: "chart-controls" },
    h("label", { for: "smoothing" }, "Smoothing"),
    slider,
    value,
    h("label", { class: "check" }, log, "Log scale"),
  );
  return { element, state };
}

export class LossChart {
  // series: [{label, color, dash}]
  constructor(container, series, state) {
    this.container = container;
    this.series = series;
    this.state = state;
    this.points = series.map(() => new Map()); // step -> loss, per series
    this.plot = null;
    this.pending = false;
    this.observer = new ResizeObserver(() => this.resize());
    this.observer.observe(container);
  }

  add(index, step, loss) {
    if (loss === null || loss === undefined) return;
    this.points[index].set(step, loss);
    this.schedule();
  }

  replace(index, rows) {
    this.points[index] = new Map(rows.filter((r) => r.loss !== null).map((r) => [r.step, r.loss]));
    this.schedule();
  }

  count(index) {
    return this.points[index].size;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  data() {
    const steps = [...new Set(this.points.flatMap((p) => [...p.keys()]))].sort((a, b) => a - b);
    const columns = this.points.map((p) => {
      const raw = steps.map((s) => (p.has(s) ? p.get(s) : null));
      // Smoothed over the series' own points only; steps it lacks stay gaps.
      const own = raw.filter((v) => v !== null);
      const smoothed = smooth(own, this.state.smoothing);
      let i = 0;
      return raw.map((v) => (v === null ? null : smoothed[i++]));
    });
    return [steps, ...columns];
  }

  options() {
    const width = Math.max(this.container.clientWidth, 320);
    return {
      width,
      height: 320,
      scales: { x: { time: false }, y: { distr: this.state.log ? 3 : 1 } },
      axes: [{ label: "step" }, { label: "loss", size: 60 }],
      series: [
        { label: "step" },
        ...this.series.map((s) => ({
          label: s.label,
          stroke: s.color,
          width: 2,
          dash: s.dash ? [6, 4] : undefined,
          spanGaps: true,
          points: { show: s.points ?? false, size: 5 },
        })),
      ],
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
    };
  }

  draw() {
    if (!globalThis.uPlot) return;
    const data = this.data();
    if (!this.plot || this.plot.__log !== this.state.log) {
      if (this.plot) this.plot.destroy();
      this.container.replaceChildren();
      this.plot = new uPlot(this.options(), data, this.container);
      this.plot.__log = this.state.log;
    } else {
      this.plot.setData(data);
    }
  }

  resize() {
    if (this.plot) this.plot.setSize({ width: Math.max(this.container.clientWidth, 320), height: 320 });
  }

  destroy() {
    this.observer.disconnect();
    if (this.plot) this.plot.destroy();
  }
}
