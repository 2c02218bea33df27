// Draws every .chart element from the numbers it carries (data-chart, the
// analytics API's own values) with the ECharts build the console serves
// locally (/assets/echarts, from the installed package; no CDN). Codes the
// API answers with (tiers, segments, stages, channels: data-codes names the
// kind) are drawn as words of the page's language (#code-labels, from the
// console's catalogue); data-chart keeps the codes.
import { echarts } from "/assets/echarts/index.js";

const labels = JSON.parse(document.getElementById("series-labels")?.textContent || "{}");
const label = (name) => labels[name] || name;
const codeLabels = JSON.parse(document.getElementById("code-labels")?.textContent || "{}");
const wordsOf = (kind) => (code) => (codeLabels[kind] || {})[code] || code;
const yuan = (fen) => "¥" + (fen / 100).toFixed(2);
const isFen = (name) => name.endsWith("_fen");
const isRate = (name) => name.endsWith("_rate");
const fmt = (name) => (v) => (isFen(name) ? yuan(v) : isRate(name) ? (v * 100).toFixed(1) + "%" : v);

function option(kind, data, word) {
  if (kind === "pie") {
    const [name] = Object.keys(data.series);
    return {
      tooltip: { trigger: "item" },
      series: [{ type: "pie", radius: "65%", data: data.x.map((x, i) => ({ name: word(x), value: data.series[name][i] })) }],
    };
  }
  if (kind === "sankey") {
    const nodes = [...new Set(data.links.flatMap((l) => [word(l[0]) + " ", " " + word(l[1])]))].map((name) => ({ name }));
    return {
      tooltip: {},
      series: [{ type: "sankey", data: nodes, links: data.links.map((l) => ({ source: word(l[0]) + " ", target: " " + word(l[1]), value: l[2] })) }],
    };
  }
  if (kind === "heatmap") {
    const axis = [1, 2, 3, 4, 5].map(String);
    const max = Math.max(1, ...data.points.map((p) => p[2]));
    return {
      tooltip: { formatter: (p) => `R${p.value[0] + 1} F${p.value[1] + 1}: ${p.value[2]} · ${yuan(p.value[3])}` },
      xAxis: { type: "category", data: axis, name: "R" },
      yAxis: { type: "category", data: axis, name: "F" },
      // Colour by the member count (dimension 2), not by the last dimension (average spend).
      visualMap: {
        min: 0, max, dimension: 2, calculable: true, orient: "horizontal", left: "center", bottom: 0,
        inRange: { color: ["#e6f4ee", "#0b6e4f"] },
      },
      series: [{ type: "heatmap", data: data.points.map((p) => [p[0] - 1, p[1] - 1, p[2], p[3]]), label: { show: true } }],
    };
  }
  const names = Object.keys(data.series);
  const money = names.filter(isFen);
  return {
    tooltip: { trigger: "axis" },
    legend: { top: 0 },
    grid: { top: 30, bottom: 30, left: 60, right: money.length ? 70 : 20 },
    xAxis: { type: "category", data: data.x.map(word) },
    yAxis: money.length && money.length < names.length
      ? [{ type: "value" }, { type: "value", axisLabel: { formatter: yuan } }]
      : [{ type: "value", axisLabel: { formatter: fmt(names[0] || "") } }],
    series: names.map((name) => ({
      name: kind === "pivot" ? name.split("→").map(word).join("→") : label(name),
      type: kind === "line" ? "line" : "bar",
      stack: kind === "pivot" ? "all" : undefined,
      yAxisIndex: money.length && money.length < names.length && isFen(name) ? 1 : 0,
      data: data.series[name],
      tooltip: { valueFormatter: fmt(name) },
    })),
  };
}

for (const el of document.querySelectorAll(".chart")) {
  const data = JSON.parse(el.dataset.chart);
  const empty = (data.x && data.x.length === 0) || (data.links && data.links.length === 0) || (data.points && data.points.length === 0);
  if (empty) {
    el.textContent = el.dataset.empty;
    el.classList.add("empty");
    el.dataset.rendered = "empty";
    continue;
  }
  const chart = echarts.init(el, null, { renderer: "canvas" });
  chart.setOption(option(el.dataset.kind, data, wordsOf(el.dataset.codes || "")));
  el.dataset.rendered = "chart";
}
document.body.dataset.chartsReady = "1";
