// The console's charts: reads the overview's numbers from the page (a JSON script element,
// never executed) and draws them with the vendored uPlot. No inline script: the page's
// Content-Security-Policy allows scripts from this origin only.
(function () {
  "use strict";
  var source = document.getElementById("overview-data");
  if (!source) { return; }
  var data = JSON.parse(source.textContent);
  var charts = [];
  window.llmgwCharts = charts;
  var colors = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563"];

  function width(el) { return Math.max(320, el.clientWidth || 600); }

  function draw(id, series, values) {
    var el = document.getElementById(id);
    var opts = {
      width: width(el), height: 220,
      series: [{}].concat(series.map(function (name, i) {
        return { label: name, stroke: colors[i % colors.length], width: 2, spanGaps: true };
      })),
      axes: [{}, { size: 60 }],
      scales: { x: { time: true } },
    };
    var chart = new uPlot(opts, [data.times].concat(values), el);
    chart.root.setAttribute("data-points", String(data.times.length));
    charts.push(chart);
  }

  draw("chart-requests", ["requests/min", "errors/min"], [data.requests_per_minute, data.errors_per_minute]);
  draw("chart-latency", ["latency p50", "latency p99", "TTFT p50", "TTFT p99"],
       [data.latency_p50_ms, data.latency_p99_ms, data.ttft_p50_ms, data.ttft_p99_ms]);
  var models = Object.keys(data.tokens);
  if (models.length) {
    draw("chart-tokens", models, models.map(function (m) { return data.tokens[m]; }));
  }
})();
