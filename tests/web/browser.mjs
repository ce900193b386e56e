// Drives Debian's headless Chromium through Baton's web view for
// tests/tests/web.rs, which starts the scheduler, daemons and runs, then reads
// what happened from the database. Input: one JSON object in BATON_WEB_TEST
// ({base, viewer, approver, runA, runB, shots, chromium}). Each check prints a
// line; the first that fails throws, and the process exits 1 naming it. With
// {mode: "shots", base, viewer, shots, pages: [[name, path]]} it only logs in
// and takes a screenshot of each page.
import { chromium } from "playwright-core";

const cfg = JSON.parse(process.env.BATON_WEB_TEST);
const WAIT = 120_000; // patience for what the run does, not a measured window

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  console.log(`ok: ${what}`);
}

async function login(browser, token) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  await page.goto(`${cfg.base}/ui/runs`);
  check(page.url().endsWith("/ui/login"), "without a session the runs list sends you to log in");
  await page.fill("#token", token);
  await Promise.all([page.waitForURL(`${cfg.base}/ui/runs`), page.click("form.login button")]);
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "baton_session");
  check(session && session.httpOnly && session.sameSite === "Strict", "the session cookie is HttpOnly and SameSite=Strict");
  return { context, page };
}

const browser = await chromium.launch({
  executablePath: cfg.chromium,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const errors = [];
if (cfg.mode === "shots") {
  // Screenshots only: log in and photograph each [name, path].
  try {
    const { page } = await login(browser, cfg.viewer);
    await page.setViewportSize({ width: 1280, height: 1400 });
    for (const [name, path] of cfg.pages) {
      await page.goto(`${cfg.base}${path}`);
      await page.waitForSelector("svg.gantt");
      // How the page loaded, as the browser measured it (figures, not checks).
      const nav = await page.evaluate(() => {
        const n = performance.getEntriesByType("navigation")[0];
        return { html_bytes: n.decodedBodySize, response_ms: n.responseEnd - n.requestStart,
                 dom_content_loaded_ms: n.domContentLoadedEventEnd - n.startTime, load_ms: n.loadEventEnd - n.startTime };
      });
      console.log(`figures: ${name} ${JSON.stringify(nav)}`);
      // The top of the page: the run, its timeline and timing (the history below is long).
      await page.screenshot({ path: `${cfg.shots}/${name}.png` });
      console.log(`ok: screenshot ${name}`);
    }
  } finally {
    await browser.close();
  }
  process.exit(0);
}
try {
  // --- a viewer -------------------------------------------------------------
  const viewer = await login(browser, cfg.viewer);
  let page = viewer.page;
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  check(await page.locator(`a[href="/ui/runs/${cfg.runA}"]`).count() === 1, "the runs list shows the run the test started");
  const csp = (await page.request.get(`${cfg.base}/ui/runs`)).headers()["content-security-policy"] || "";
  check(csp.includes("script-src 'self'") && !csp.includes("unsafe-inline"), "a strict Content-Security-Policy");

  await page.goto(`${cfg.base}/ui/runs/${cfg.runA}`);
  const viewerPage = page;
  // The title is attacker-controlled: it must be text, and no script may have run.
  const title = await page.locator("p.title").textContent();
  check(title.includes("<script>"), "a pull request title with <script> renders as text");
  check(await page.evaluate(() => window.__pwned === undefined), "the title's script did not run");
  // The test started this page once both runs wait for approval.
  const hold = await page.locator("p.hold").allTextContents();
  check(hold.some((h) => h.includes("waits for approval") && h.includes("human-approval")), "the gate hold and its reason appear");
  check(await page.locator('svg.gantt g.lane[data-step="migrate"] rect.bar.execute.s-succeeded').count() === 1,
    "the finished step has its bar");
  check(await page.locator('svg.gantt g.lane[data-step="apply"] rect.bar.wait.approval').count() === 1,
    "the approval wait is drawn as a wait");
  check(await page.locator('svg.gantt g.lane[data-step="apply"] rect.bar.execute').count() === 0,
    "the held step has not run");
  check(await page.locator("button.approve").count() === 0, "a viewer sees no approve button");
  check((await page.locator("table.timing").textContent()).includes("5–10 min"), "the timing table shows the pipeline's typical duration");
  await page.screenshot({ path: `${cfg.shots}/run-waiting-for-approval.png`, fullPage: true });
  // No reload from here on: a marker set now must survive while the page changes.
  await page.evaluate(() => { window.__sameDocument = true; });

  // A viewer's forged approval, with the session but without the CSRF token.
  const forged = await page.request.post(`${cfg.base}/ui/runs/${cfg.runA}/approve`, {
    form: { step: "apply", plan_hash: "x" }, maxRedirects: 0,
  });
  check(forged.status() === 403, `a POST without CSRF token is refused (${forged.status()})`);

  // --- an approver ------------------------------------------------------------
  const approver = await login(browser, cfg.approver);
  page = approver.page;
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  const forged2 = await page.request.post(`${cfg.base}/ui/runs/${cfg.runA}/approve`, {
    form: { step: "apply", plan_hash: "x", csrf: "0".repeat(64) }, maxRedirects: 0,
  });
  check(forged2.status() === 403, `an approver's POST with a wrong CSRF token is refused (${forged2.status()})`);
  await page.goto(`${cfg.base}/ui/runs/${cfg.runA}`);
  await page.waitForSelector("button.approve");
  await page.fill("form.decide input[name=comment]", "reviewed in the browser");
  await Promise.all([page.waitForURL(`${cfg.base}/ui/runs/${cfg.runA}`), page.click("button.approve")]);
  await page.waitForSelector('section.summary .badge.ok >> text=succeeded');
  check(await page.locator('svg.gantt g.lane[data-step="apply"] rect.bar.execute.s-succeeded').count() === 1,
    "the approved step ran");
  await page.screenshot({ path: `${cfg.shots}/run-succeeded.png`, fullPage: true });

  // Meanwhile the viewer's page, never reloaded, followed the run.
  await viewerPage.waitForSelector('svg.gantt g.lane[data-step="apply"] rect.bar.execute.s-succeeded');
  await viewerPage.waitForSelector('section.summary .badge.ok >> text=succeeded');
  check(await viewerPage.evaluate(() => window.__sameDocument === true), "the timeline gained bars without a reload");

  // The second run: rejected from the page, so it rolls back.
  await page.goto(`${cfg.base}/ui/runs/${cfg.runB}`);
  await page.waitForSelector("button.reject");
  await page.fill("form.decide input[name=comment]", "not this week");
  await Promise.all([page.waitForURL(`${cfg.base}/ui/runs/${cfg.runB}`), page.click("button.reject")]);
  await page.waitForSelector('section.summary .badge >> text=rolled back');
  await page.waitForSelector("ol.compensations li");
  check((await page.locator("ol.compensations").textContent()).includes("migrate"), "the compensation order is shown");
  check(await page.locator('svg.gantt rect.bar.compensate').count() >= 1, "the compensation is drawn");
  await page.screenshot({ path: `${cfg.shots}/run-rolled-back.png`, fullPage: true });

  await page.goto(`${cfg.base}/ui/runs`);
  await page.screenshot({ path: `${cfg.shots}/runs.png`, fullPage: true });
  check(errors.length === 0, `no script errors in the pages (${errors.join("; ")})`);
} finally {
  await browser.close();
}
