// Mesh viz dashboard: reads the viz API of the cluster serving it, which
// answers for every linked cluster. Everything shown comes from other
// clusters too, so it is only ever set as text (never as HTML).
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function link(text, href) {
  const a = el("a", text);
  a.href = href;
  return a;
}

const pct = (v) => (v === null || v === undefined ? "-" : (v * 100).toFixed(1) + "%");
const ms = (v) => (v === null || v === undefined ? "-" : v.toFixed(1) + "ms");
const rps = (v) => (v || 0).toFixed(1);
const workloadHref = (cluster, ns, name) =>
  "#/workload/" + [cluster, ns, name].map(encodeURIComponent).join("/");

async function api(view, params) {
  const q = new URLSearchParams(params || {});
  const resp = await fetch("/api/v1/" + view + "?" + q.toString());
  if (!resp.ok) throw new Error(view + ": " + resp.status);
  return resp.json();
}

function fill(tbody, rows, cells) {
  const body = $(tbody);
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const c of cells(r)) {
      const td = document.createElement("td");
      if (c instanceof Node) td.appendChild(c);
      else td.textContent = c === undefined || c === null ? "" : String(c);
      if (typeof c === "string" && /^[0-9.]+(ms|%)?$/.test(c)) td.className = "num";
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  return body;
}

const seen = { clusters: new Map(), unreachable: new Map() };

function note(answer) {
  for (const c of answer.clusters || []) seen.clusters.set(c.name, c);
  for (const u of answer.unreachable || []) seen.unreachable.set(u.cluster, u.error);
  for (const c of answer.clusters || []) seen.unreachable.delete(c.name);
}

function showClusters() {
  const box = $("#clusters");
  box.replaceChildren();
  for (const name of [...seen.clusters.keys()].sort()) box.appendChild(el("span", name, { "data-cluster": name }));
  const u = $("#unreachable");
  u.replaceChildren();
  for (const [cluster, error] of seen.unreachable) {
    u.appendChild(el("div", "Cluster " + cluster + " is unreachable: " + error, { "data-cluster": cluster }));
  }
  u.hidden = seen.unreachable.size === 0;
  $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
}

function drawGraph(edges) {
  const svg = $("#graph");
  svg.replaceChildren();
  const defs = document.createElementNS(SVG, "defs");
  const marker = document.createElementNS(SVG, "marker");
  for (const [k, v] of Object.entries({ id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto" })) marker.setAttribute(k, v);
  const tip = document.createElementNS(SVG, "path");
  tip.setAttribute("d", "M0,0 L10,5 L0,10 z");
  tip.setAttribute("fill", "#7d8a99");
  marker.appendChild(tip);
  defs.appendChild(marker);
  svg.appendChild(defs);
  // One column per cluster, a box per workload.
  const key = (name, cluster) => cluster + "/" + name;
  const nodes = new Map();
  for (const e of edges) {
    nodes.set(key(e.src, e.src_cluster), { name: e.src, cluster: e.src_cluster, ns: e.src_namespace });
    nodes.set(key(e.dst, e.dst_cluster), { name: e.dst, cluster: e.dst_cluster, ns: e.dst_namespace });
  }
  // The cluster serving the page first, then the others.
  const home = [...seen.clusters.keys()][0];
  const clusters = [...new Set([...nodes.values()].map((n) => n.cluster))].sort((x, y) =>
    x === home ? -1 : y === home ? 1 : x.localeCompare(y)
  );
  const colWidth = Math.max(260, 900 / Math.max(1, clusters.length));
  const rowsIn = new Map();
  const pos = new Map();
  for (const [k, n] of [...nodes.entries()].sort()) {
    const col = clusters.indexOf(n.cluster);
    const row = rowsIn.get(col) || 0;
    rowsIn.set(col, row + 1);
    pos.set(k, { x: 30 + col * colWidth, y: 50 + row * 60, n });
  }
  const height = 80 + Math.max(1, ...rowsIn.values()) * 60;
  svg.setAttribute("height", String(height));
  svg.setAttribute("width", String(Math.max(900, 60 + clusters.length * colWidth)));
  clusters.forEach((c, i) => {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", String(30 + i * colWidth));
    t.setAttribute("y", "25");
    t.setAttribute("class", "cluster-label");
    t.textContent = "cluster " + c;
    svg.appendChild(t);
  });
  const W = 170, H = 30;
  for (const e of edges) {
    const a = pos.get(key(e.src, e.src_cluster)), b = pos.get(key(e.dst, e.dst_cluster));
    const cross = e.src_cluster !== e.dst_cluster;
    let line;
    if (a.x === b.x) {
      // Same column: an arc to the right of the boxes.
      line = document.createElementNS(SVG, "path");
      const x = a.x + W, bulge = 30 + Math.abs(b.y - a.y) / 4;
      line.setAttribute("d", `M${x},${a.y + H / 2} C${x + bulge},${a.y + H / 2} ${x + bulge},${b.y + H / 2} ${x},${b.y + H / 2}`);
      line.setAttribute("fill", "none");
    } else {
      line = document.createElementNS(SVG, "line");
      const right = b.x > a.x;
      line.setAttribute("x1", String(a.x + (right ? W : 0)));
      line.setAttribute("y1", String(a.y + H / 2));
      line.setAttribute("x2", String(b.x + (right ? 0 : W)));
      line.setAttribute("y2", String(b.y + H / 2));
    }
    line.setAttribute("class", "edge" + (cross ? " cross-cluster" : ""));
    line.setAttribute("data-src", e.src + "@" + e.src_cluster);
    line.setAttribute("data-dst", e.dst + "@" + e.dst_cluster);
    const title = document.createElementNS(SVG, "title");
    title.textContent = e.src_identity + " -> " + e.dst_identity + " " + rps(e.rps) + " rps";
    line.appendChild(title);
    svg.appendChild(line);
  }
  for (const [k, p] of pos) {
    const g = document.createElementNS(SVG, "a");
    g.setAttribute("href", workloadHref(p.n.cluster, p.n.ns, p.n.name));
    g.setAttribute("class", "node");
    g.setAttribute("data-node", k);
    const r = document.createElementNS(SVG, "rect");
    for (const [a, v] of Object.entries({ x: p.x, y: p.y, width: W, height: H, rx: 4 })) r.setAttribute(a, String(v));
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", String(p.x + 8));
    t.setAttribute("y", String(p.y + 19));
    t.textContent = p.n.name + " (" + p.n.cluster + ")";
    g.appendChild(r);
    g.appendChild(t);
    svg.appendChild(g);
  }
}

let lastEdges = [];

function showDetail() {
  const m = location.hash.match(/^#\/workload\/([^/]+)\/([^/]*)\/([^/]+)$/);
  const box = $("#detail");
  if (!m) {
    box.hidden = true;
    return;
  }
  const [cluster, ns, name] = m.slice(1).map(decodeURIComponent);
  box.hidden = false;
  $("#detail-title").textContent = ns + "/" + name + " in " + cluster;
  const mine = lastEdges.filter(
    (e) => (e.src === name && e.src_cluster === cluster) || (e.dst === name && e.dst_cluster === cluster)
  );
  fill("#detail-edges tbody", mine, (e) => [
    link(e.src + " (" + e.src_cluster + ")", workloadHref(e.src_cluster, e.src_namespace, e.src)),
    link(e.dst + " (" + e.dst_cluster + ")", workloadHref(e.dst_cluster, e.dst_namespace, e.dst)),
    e.service || "-",
    rps(e.rps),
    pct(e.success),
  ]);
}

async function refresh() {
  const jobs = [
    api("stat", { kind: "deploy" }).then((a) => {
      note(a);
      fill("#services tbody", a.rows, (r) => [
        r.cluster,
        r.namespace,
        link(r.name, workloadHref(r.cluster, r.namespace, r.name)),
        String(r.meshed || 0),
        rps(r.rps),
        pct(r.success),
        ms(r.p50_ms),
        ms(r.p99_ms),
      ]).setAttribute("data-loaded", "1");
    }),
    api("edges").then((a) => {
      note(a);
      lastEdges = a.rows;
      drawGraph(a.rows);
      showDetail();
    }),
    api("routes").then((a) => {
      note(a);
      fill("#routes tbody", a.rows, (r) => [r.cluster, r.name, r.service, rps(r.rps), pct(r.success), ms(r.p50_ms), ms(r.p99_ms)]);
    }),
    api("links").then((a) => {
      note(a);
      fill("#links tbody", a.rows, (l) => [
        l.cluster,
        l.to,
        l.alive === null ? "-" : l.alive ? "yes" : "no",
        l.services === null ? "-" : String(l.services),
        ms(l.probe_p50_ms),
        ms(l.probe_p99_ms),
        String(Math.round(l.probe_failures)),
        rps(l.rps),
        pct(l.success),
        (l.failover || []).map((f) => f.service + " " + f.direction + " " + f.reason + " x" + f.count).join(", ") || "-",
      ]);
    }),
  ];
  await Promise.allSettled(jobs);
  showClusters();
}

const tapRows = [];

async function tapLoop() {
  for (;;) {
    try {
      const a = await api("tap", { ms: "1000", max: "200" });
      note(a);
      for (const e of a.rows) tapRows.unshift(e);
      tapRows.splice(50);
      fill("#tap tbody", tapRows, (e) => [
        e.cluster,
        e.namespace + "/" + e.pod,
        e.direction,
        e.method,
        e.direction === "inbound" ? ":" + e.port : e.authority,
        e.path,
        String(e.status),
        (e.latency_us / 1000).toFixed(1) + "ms",
        e.direction === "inbound" ? e.client_id : e.tls,
      ]);
    } catch (err) {
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
}

window.addEventListener("hashchange", showDetail);
refresh();
setInterval(refresh, 5000);
tapLoop();
