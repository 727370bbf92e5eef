// Screenshots of a running TensorBoard in headless Chromium, driven by playwright-core: used by
// docs/panels.py (`make panels`), which starts and stops TensorBoard.
//
//   node docs/panels_capture.mjs <chromium> <tensorboard url> <time series png> <custom scalars png>
//
// TensorBoard keeps its chart settings in localStorage ("_tb_global_settings"; the Custom Scalars tab
// "_ignoreYOutliers", and its smoothing in the URL): smoothing 0 shows the raw noise the comparison
// is about, and not ignoring outliers keeps the best peaks on the charts. Both are set before the
// page loads. Charts are drawn by a worker, so each shot waits until the
// chart canvases have content, not for a fixed time.
import { createRequire } from "node:module";
import path from "node:path";

// playwright-core lives where docs/panels.py installed it (NODE_PATH); ES modules ignore NODE_PATH.
const require = createRequire(path.join(process.env.NODE_PATH, "noop.js"));
const { chromium } = require("playwright-core");

const [executablePath, url, timeSeriesPath, customScalarsPath] = process.argv.slice(2);
const SETTINGS = { scalarSmoothing: 0, ignoreOutliers: false, autoReload: false };

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
  ],
});
try {
  const context = await browser.newContext({ viewport: { width: 1500, height: 1250 }, deviceScaleFactor: 1 });
  await context.addInitScript((settings) => {
    window.localStorage.setItem("_tb_global_settings", JSON.stringify(settings));
    // The Custom Scalars tab is the older dashboard, with settings of its own.
    window.localStorage.setItem("_ignoreYOutliers", "false");
  }, SETTINGS);
  const page = await context.newPage();

  // The default tab, filtered to the stability tags: every card overlays the variant runs.
  await page.goto(`${url}/?darkMode=false&tagFilter=${encodeURIComponent("stability/")}#timeseries`);
  await page.waitForSelector("card-view", { timeout: 60000 });
  // The settings pane (opened on first visit) would cover a column of cards: its values are set above.
  await page.getByRole("button", { name: "Close side pane" }).click({ timeout: 5000 }).catch(() => {});
  await page.setViewportSize({ width: 1500, height: 2100 });
  await page.waitForTimeout(8000); // the chart worker draws after the data arrives
  await page.screenshot({ path: timeSeriesPath });
  await page.setViewportSize({ width: 1500, height: 1250 });
  console.log(`wrote ${timeSeriesPath}`);

  await page.goto(`${url}/?darkMode=false#custom_scalars&_smoothingWeight=0`);
  await page.waitForSelector("tf-custom-scalar-multi-line-chart-card", { timeout: 60000 });
  await page.waitForTimeout(8000);
  await page.screenshot({ path: customScalarsPath });
  console.log(`wrote ${customScalarsPath}`);
} finally {
  await browser.close();
}
