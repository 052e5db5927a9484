// Drives the viz dashboard in Debian's Chromium (headless, through
// playwright-core: no browser download) and checks what the DOM shows.
// Usage: node dashboard.mjs <dashboard URL> <artifacts dir> <src@cluster> <dst@cluster>
// Exits non-zero, naming the check, when one fails; screenshots go to the
// artifacts directory either way.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const [url, artifacts, crossSrc, crossDst] = process.argv.slice(2);
if (!url || !artifacts || !crossSrc || !crossDst) {
  console.error("usage: node dashboard.mjs <url> <artifacts dir> <src@cluster> <dst@cluster>");
  process.exit(2);
}
mkdirSync(artifacts, { recursive: true });
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
// The page must not reach anything but viz (no CDN).
const elsewhere = [];
page.on("request", (r) => {
  if (!r.url().startsWith(new URL(url).origin)) elsewhere.push(r.url());
});

let failed = false;
async function check(name, fn, timeout = 30000) {
  const until = Date.now() + timeout;
  let last = "";
  for (;;) {
    try {
      const detail = await fn();
      console.log("ok: " + name + (detail ? " (" + detail + ")" : ""));
      return;
    } catch (e) {
      last = String(e.message || e);
    }
    if (Date.now() > until) {
      console.log("FAILED: " + name + ": " + last);
      failed = true;
      return;
    }
    await page.waitForTimeout(500);
  }
}

function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}

await page.goto(url, { waitUntil: "load" });

await check("the services table has rows of both clusters", async () => {
  const clusters = await page.$$eval("#services tbody tr", (rows) =>
    rows.map((r) => r.children[0].textContent)
  );
  const [a, b] = [crossSrc.split("@")[1], crossDst.split("@")[1]];
  assert(clusters.includes(a) && clusters.includes(b), "clusters seen: " + JSON.stringify([...new Set(clusters)]));
  return [...new Set(clusters)].join(", ");
});

await check("the graph draws the cross-cluster edge " + crossSrc + " -> " + crossDst, async () => {
  const edges = await page.$$eval("#graph .edge.cross-cluster", (ls) =>
    ls.map((l) => l.getAttribute("data-src") + " -> " + l.getAttribute("data-dst"))
  );
  assert(edges.includes(crossSrc + " -> " + crossDst), "cross-cluster edges: " + JSON.stringify(edges));
  return edges.length + " cross-cluster edge(s)";
});

await check("tap shows live requests", async () => {
  const first = await page.$$eval("#tap tbody tr", (rows) => rows.map((r) => r.textContent));
  assert(first.length > 0, "no request in the tap table");
  await page.waitForTimeout(2500);
  const later = await page.$$eval("#tap tbody tr", (rows) => rows.map((r) => r.textContent));
  assert(later.length > 0 && later.join("|") !== first.join("|"), "the tap table did not change in 2.5 s");
  const statuses = await page.$$eval("#tap tbody tr", (rows) => rows.map((r) => r.children[6].textContent));
  assert(statuses.includes("200"), "no 200 among " + JSON.stringify(statuses.slice(0, 5)));
  return later.length + " rows";
});

await page.screenshot({ path: join(artifacts, "dashboard.png"), fullPage: true });

const [srcName, srcCluster] = crossSrc.split("@");
await check("a workload links to its own page, with its edges", async () => {
  await page.click(`#services tbody tr:has(td:text-is("${srcCluster}")) a:text-is("${srcName}")`);
  await page.waitForSelector("#detail:not([hidden])", { timeout: 3000 });
  const title = await page.textContent("#detail-title");
  assert(title.includes(srcName) && title.includes(srcCluster), "title " + JSON.stringify(title));
  const rows = await page.$$eval("#detail-edges tbody tr", (rs) => rs.map((r) => r.textContent));
  const [dstName, dstCluster] = crossDst.split("@");
  assert(rows.some((r) => r.includes(dstName + " (" + dstCluster + ")")), "edges: " + JSON.stringify(rows));
  return rows.length + " edges";
}, 10000);

await page.screenshot({ path: join(artifacts, "workload.png"), fullPage: true });

await check("no script error and nothing fetched from elsewhere", async () => {
  assert(errors.length === 0, "script errors: " + JSON.stringify(errors));
  assert(elsewhere.length === 0, "requests elsewhere: " + JSON.stringify(elsewhere));
}, 0);

await browser.close();
process.exit(failed ? 1 : 0);
