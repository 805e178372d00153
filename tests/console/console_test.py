"""The console in a real browser (headless Chromium driven by Playwright), against a real
`sluice serve` on the warehouse given by --warehouse (sqlite or postgres).

Each step names the behaviour it proves; a failed step raises and the script exits 1.
Screenshots of every page go to --shots for a person to look at.
"""

import argparse
import decimal
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from playwright.sync_api import expect, sync_playwright

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """`sluice serve` on a private data directory (and, for postgres, a private database)."""

    def __init__(self, binary, warehouse):
        self.binary = binary
        self.dir = tempfile.mkdtemp(prefix="sluice-console-")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        self.env["SLUICE_MASTER_KEY"] = secrets.token_hex(32)
        self.env["SLUICE_DATA_DIR"] = self.dir
        self.db = None
        if warehouse == "postgres":
            admin = os.environ.get("SLUICE_TEST_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres")
            self.db = "sluice_console_" + secrets.token_hex(4)
            self.admin_url = admin
            subprocess.run(["psql", admin, "-qc", f"CREATE DATABASE {self.db}"], check=True)
            self.env["SLUICE_DATABASE_URL"] = admin.rsplit("/", 1)[0] + "/" + self.db
            self.cli("migrate")
            self.cli("tenant", "create", "acme")
        self.proc = subprocess.Popen(
            [binary, "--retry-base-ms", "20", "serve", "--listen", f"127.0.0.1:{self.port}"],
            env=self.env,
            stdout=open(os.path.join(self.dir, "serve.log"), "w"),
            stderr=subprocess.STDOUT,
        )
        for _ in range(200):
            try:
                urllib.request.urlopen(self.base + "/health", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        else:
            raise RuntimeError("sluice serve did not answer: " + self.log())

    def cli(self, *args):
        out = subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"sluice {' '.join(args)} failed: {out.stderr}")
        return out.stdout.strip()

    def log(self):
        try:
            with open(os.path.join(self.dir, "serve.log")) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.db:
            subprocess.run(["psql", self.admin_url, "-qc", f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)"], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def api(server, key, path, method="GET"):
    req = urllib.request.Request(server.base + path, method=method, headers={"Authorization": "Bearer " + key})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def sign_in(page, server, key, next_path=None):
    page.goto(server.base + (f"/sign-in?next={next_path}" if next_path else "/sign-in"))
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state("networkidle")


def csrf_of(page):
    return page.locator('form[action="/sign-out"] input[name=csrf]').get_attribute("value")


def wait_for_run(server, key, run_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            run = api(server, key, f"/v1/runs/{run_id}")
        except urllib.error.HTTPError as e:
            # A queued job's run exists once a worker starts it.
            if e.code != 404:
                raise
            run = {"status": "running"}
        if run["status"] not in ("queued", "running"):
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} still running after {timeout} s")


def accessible(page, name, axe):
    """axe-core's WCAG 2 A and AA rules (contrast, labels, names, landmarks) on the page."""
    page.add_script_tag(path=axe)
    result = page.evaluate(
        "axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21aa']}})"
    )
    problems = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
    ]
    assert not problems, f"{name}: " + "; ".join(problems)


def step(name):
    print(f"  - {name}", flush=True)


def run(binary, warehouse, shots, chromium, axe):
    server = Server(binary, warehouse)
    try:
        admin = server.cli("key", "create", "--tenant", "acme", "--role", "admin", "--name", "console admin")
        analyst = server.cli("key", "create", "--tenant", "acme", "--role", "analyst", "--name", "analyst")
        operator = server.cli("key", "create", "--tenant", "acme", "--role", "operator", "--name", "operator")
        first = json.loads(server.cli("trigger", os.path.join(ROOT, "examples/invoices.toml"), "--wait", "--json"))
        server.cli("trigger", os.path.join(ROOT, "examples/bills.toml"), "--wait", "--json")
        server.cli("trigger", os.path.join(ROOT, "examples/payments.toml"), "--wait", "--json")
        assert first["quarantined"] == 8, first
        # A pipeline whose file is not there yet: its job dies after its attempts.
        missing = os.path.join(server.dir, "missing.toml")
        with open(missing, "w") as f:
            f.write(open(os.path.join(ROOT, "examples/invoices.toml")).read()
                    .replace("acme-invoices", "acme-missing").replace("invoices.csv", "missing.csv"))
        server.cli("trigger", missing)
        deadline = time.time() + 60
        while not api(server, admin, "/v1/dead-letters")["items"]:
            assert time.time() < deadline, "no dead letter: " + server.log()
            time.sleep(0.3)

        def shot(page, name):
            page.screenshot(path=os.path.join(shots, f"{warehouse}-{name}.png"), full_page=True)
            accessible(page, name, axe)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            ctx = browser.new_context(viewport={"width": 1280, "height": 860})
            page = ctx.new_page()

            step("a page without a session redirects to sign-in, and comes back after it")
            page.goto(server.base + "/runs?status=succeeded")
            assert re.search(r"/sign-in\?next=%2Fruns%3Fstatus%3Dsucceeded$", page.url), page.url
            shot(page, "sign-in")
            page.get_by_label("API key").fill("slk_000000000000_" + "0" * 64)
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_role("alert")).to_contain_text("not valid")
            page.get_by_label("API key").fill(admin)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(re.compile(r"/runs\?status=succeeded$"))
            cookie = [c for c in ctx.cookies() if c["name"] == "sluice_session"][0]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie

            step("the overview shows the synced pipeline and its last run; the keyboard starts at a skip link")
            page.goto(server.base + "/")
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.textContent") == "Skip to content"
            row = page.get_by_role("row").filter(has_text="acme-invoices")
            expect(row).to_contain_text("succeeded")
            expect(row).to_contain_text("csv")
            expect(row.get_by_role("cell").nth(4)).to_have_text("16")
            expect(row.get_by_role("cell").nth(5)).to_have_text("8")
            shot(page, "overview")

            step("the run's page shows the accounting of sync --json and the quarantine per rule")
            row.get_by_role("link").first.click()
            expect(page.locator('[data-field="rows_read"]')).to_have_text(str(first["rows_read"]))
            expect(page.locator('[data-field="quarantined"]')).to_have_text("8")
            expect(page.locator('[data-field="deduplicated"]')).to_have_text(str(first["deduplicated"]))
            expect(page.get_by_role("link", name="currency_code")).to_be_visible()
            shot(page, "run")

            step("quarantine: filter by rule, open the row, fix the failing field, save, retry")
            page.goto(server.base + "/quarantine?pipeline=acme-invoices&rule=currency_code")
            shot(page, "quarantine")
            rows = page.locator("table.data tbody tr")
            expect(rows).to_have_count(1)
            rows.first.get_by_role("link").first.click()
            row_url = page.url
            row_id = row_url.rsplit("/", 1)[1]
            currency = page.get_by_label("Currency", exact=True)
            expect(currency).to_have_value("USX")
            expect(page.locator(".field.invalid")).to_contain_text("currency_code")
            expect(page.get_by_text("invoices.csv")).to_be_visible()
            expect(page.get_by_text("pending", exact=True)).to_be_visible()
            shot(page, "row")
            currency.fill("USD")
            page.get_by_role("button", name="Save").click()
            expect(page.get_by_role("status")).to_contain_text("Saved")
            expect(page.get_by_text("fixed", exact=True)).to_be_visible()
            page.get_by_role("button", name="Retry", exact=True).click()
            page.wait_for_url(re.compile(r"/runs/[^/?]+\?notice=retried$"))
            replay_run = page.url.split("/runs/")[1].split("?")[0]
            replayed = wait_for_run(server, admin, replay_run)
            assert replayed["status"] == "succeeded" and replayed["loaded"] == 1, replayed
            page.reload()
            expect(page.locator('[data-field="loaded"]')).to_have_text("1")
            expect(page.locator('[data-field="rows_read"]')).to_have_text("1")
            shot(page, "replay-run")
            page.goto(row_url)
            expect(page.get_by_text("replayed", exact=True).first).to_be_visible()
            assert api(server, admin, f"/v1/quarantine/{row_id}")["status"] == "replayed"
            audit = api(server, admin, "/v1/audit")["items"]
            assert any(e["action"] == "quarantine.fix" and e["target"] == row_id for e in audit), audit

            step("several rows retried as one replay run")
            page.goto(server.base + "/quarantine?pipeline=acme-invoices&status=pending")
            boxes = page.locator('tbody input[name="ids"]')
            n = boxes.count()
            assert n >= 2, n
            boxes.nth(0).check()
            boxes.nth(1).check()
            page.get_by_role("button", name="Retry selected").click()
            page.wait_for_url(re.compile(r"/runs/[^/?]+\?notice=retried$"))
            batch = wait_for_run(server, admin, page.url.split("/runs/")[1].split("?")[0])
            assert batch["rows_read"] == 2 and batch["quarantined"] == 2, batch

            step("every open row matching a filter retried as one replay run")
            page.goto(server.base + "/quarantine?pipeline=acme-bills")
            page.get_by_role("button", name="Retry everything matching the filter").click()
            page.wait_for_url(re.compile(r"/runs/[^/?]+\?notice=retried$"))
            matching = wait_for_run(server, admin, page.url.split("/runs/")[1].split("?")[0])
            assert matching["rows_read"] == 3 and matching["quarantined"] == 3, matching

            step("a form without the session's CSRF token is refused")
            forged = page.request.post(server.base + f"/quarantine/{row_id}/ignore", form={"reason": "x"})
            assert forged.status == 403, forged.status

            step("dead letters, audit log and keys pages; a key is shown once and revoked")
            page.goto(server.base + "/dead-letters")
            letter = page.get_by_role("row").filter(has_text="acme-missing")
            expect(letter).to_have_count(1)
            shot(page, "dead-letters")
            letter.get_by_role("link").first.click()
            # Not found is permanent: one attempt, then the dead letter.
            expect(page.locator("table.data tbody tr")).to_have_count(1)
            expect(page.locator("table.data")).to_contain_text("missing.csv")
            shot(page, "dead-letter")
            with open(os.path.join(server.dir, "missing.csv"), "w") as f:
                f.write(open(os.path.join(ROOT, "examples/invoices.csv")).read())
            page.get_by_role("button", name="Replay").click()
            page.wait_for_url(re.compile(r"/runs/[^/?]+\?notice=replayed$"))
            again = wait_for_run(server, admin, page.url.split("/runs/")[1].split("?")[0])
            assert again["status"] == "succeeded" and again["rows_read"] == 26, again
            page.goto(server.base + "/dead-letters")
            expect(page.get_by_role("row").filter(has_text="acme-missing").get_by_role("link", name="run")).to_be_visible()
            page.goto(server.base + "/audit")
            expect(page.get_by_role("cell", name="quarantine.fix").first).to_be_visible()
            shot(page, "audit")
            page.goto(server.base + "/keys")
            page.get_by_label("Role").select_option("viewer")
            page.get_by_label("Name").fill("from the console")
            page.get_by_role("button", name="Create key").click()
            secret = page.get_by_label("The new API key").input_value()
            assert secret.startswith("slk_"), secret
            assert api(server, secret, "/v1/pipelines")["items"], "the new key works"
            shot(page, "keys")
            page.goto(server.base + "/keys")
            assert secret not in page.content(), "a key is shown once"
            page.get_by_role("row").filter(has_text="from the console").get_by_role("button", name=re.compile("Revoke")).click()
            expect(page.get_by_role("status")).to_contain_text("revoked")
            try:
                api(server, secret, "/v1/pipelines")
                raise AssertionError("a revoked key still works")
            except urllib.error.HTTPError as e:
                assert e.code == 401, e.code

            step("the finance page shows the figures of GET /v1/finance/dashboard")
            q = "as_of=2024-06-30&from=2024-01-01&to=2024-12-31"
            page.goto(server.base + "/finance?" + q)
            dash = api(server, admin, "/v1/finance/dashboard?" + q)
            assert dash["currencies"], dash
            for cur, d in dash["currencies"].items():
                section = page.locator(f'section.currency[data-currency="{cur}"]')
                for path in ["cash_flow.inflow", "cash_flow.outflow", "cash_flow.net",
                             "profitability.revenue", "profitability.net_profit", "anomalies_count"]:
                    a, b = path.split(".") if "." in path else (path, None)
                    want = str(d[a][b] if b else d[a])
                    expect(section.locator(f'[data-figure="{path}"]')).to_have_text(want)
                for side in ["ar_aging", "ap_aging"]:
                    total = sum(decimal.Decimal(v) for v in d[side].values())
                    got = decimal.Decimal(section.locator(f'[data-figure="{side}.total"]').inner_text())
                    assert got == total, (cur, side, got, total)
            shot(page, "finance")
            usd = page.locator('section.currency[data-currency="USD"]')
            expect(usd.locator('[data-figure="anomalies_count"]')).to_have_text("1")
            expect(usd.get_by_role("img", name=re.compile("Cash flow USD"))).to_be_visible()
            usd.get_by_role("link", name="payment PAY-006").click()
            expect(page.get_by_role("alert")).to_contain_text("overpayment")
            expect(page.get_by_role("definition").filter(has_text="1500.00")).to_have_count(1)
            shot(page, "document")
            page.get_by_role("link", name="INV-1004").click()
            expect(page.get_by_role("heading", level=1)).to_contain_text("INV-1004")
            page.goto(server.base + "/finance?" + q)
            page.get_by_role("link", name="By customer →").first.click()
            expect(page.get_by_role("heading", level=1)).to_contain_text("AR aging")
            shot(page, "aging")

            step("the dark theme")
            page.goto(server.base + "/")
            page.get_by_role("button", name=re.compile("theme")).click()
            assert page.evaluate("document.documentElement.dataset.theme") == "dark"
            shot(page, "overview-dark")
            page.goto(server.base + "/finance?" + q)
            shot(page, "finance-dark")
            page.goto(row_url)
            shot(page, "row-dark")
            page.goto(server.base + "/")
            page.get_by_role("button", name=re.compile("theme")).click()

            step("sign out ends the session")
            page.get_by_role("button", name="Sign out").click()
            page.wait_for_url(re.compile(r"/sign-in$"))
            page.goto(server.base + "/quarantine")
            assert "/sign-in" in page.url, page.url
            ctx.close()

            step("an analyst sees no fix controls, and a forged POST from its session is refused")
            ctx = browser.new_context(viewport={"width": 1280, "height": 860})
            page = ctx.new_page()
            sign_in(page, server, analyst)
            nav = page.get_by_role("navigation", name="Main")
            expect(nav.get_by_role("link", name="Keys")).to_have_count(0)
            expect(nav.get_by_role("link", name="Upload")).to_have_count(0)
            expect(page.get_by_role("button", name=re.compile("^Sync"))).to_have_count(0)
            page.goto(server.base + "/quarantine?pipeline=acme-invoices&status=pending")
            expect(page.get_by_role("button", name="Retry selected")).to_have_count(0)
            page.locator("tbody tr").first.get_by_role("link").first.click()
            pending_url = page.url
            pending_id = pending_url.rsplit("/", 1)[1]
            expect(page.get_by_role("button", name="Save")).to_have_count(0)
            expect(page.get_by_role("button", name="Retry")).to_have_count(0)
            assert page.locator(".row-form input[name^='raw.']").first.get_attribute("readonly") is not None
            shot(page, "row-analyst")
            token = csrf_of(page)
            before = api(server, admin, f"/v1/quarantine/{pending_id}")
            first_column = next(iter(before["raw"]))
            forged = page.request.post(server.base + f"/quarantine/{pending_id}/save",
                                       form={"csrf": token, f"raw.{first_column}": "forged"})
            assert forged.status == 403, forged.status
            forged = page.request.post(server.base + f"/v1/quarantine/{pending_id}/ignore",
                                       data=json.dumps({"reason": "forged"}),
                                       headers={"Content-Type": "application/json", "X-CSRF-Token": token})
            assert forged.status == 403, forged.status
            assert api(server, admin, f"/v1/quarantine/{pending_id}") == before, "the row is untouched"
            assert page.goto(server.base + "/keys").status == 403
            ctx.close()

            step("an operator uploads a file and follows it to its run")
            ctx = browser.new_context(viewport={"width": 1280, "height": 860})
            page = ctx.new_page()
            sign_in(page, server, operator, "%2Fupload")
            upload = os.path.join(server.dir, "more-invoices.csv")
            with open(upload, "w") as f:
                f.write("InvoiceId,Number,CustomerRef,Customer,IssueDate,DueDate,Currency,Total,Balance,Status,Kind,LastModified\n")
                f.write("INV-2001,2001,C-01,Northwind Traders,2024-06-01,2024-07-01,USD,10.00,10.00,open,invoice,2024-06-01T10:00:00Z\n")
                f.write("INV-2002,2002,C-02,Contoso Ltd,2024-06-02,2024-07-02,EUR,20.00,20.00,open,invoice,2024-06-02T10:00:00Z\n")
            page.get_by_label("Pipeline").select_option("acme-invoices")
            page.get_by_label("File").set_input_files(upload)
            shot(page, "upload")
            page.get_by_role("button", name="Upload and sync").click()
            page.wait_for_url(re.compile(r"/runs/[^/?]+$"), timeout=30000)
            upload_run = page.url.rsplit("/", 1)[1]
            # The page follows the run by itself (queued, running, then its counts).
            expect(page.locator('[data-field="inserted"]')).to_have_text("2", timeout=30000)
            expect(page.locator('[data-field="status"]')).to_contain_text("succeeded")
            done = wait_for_run(server, admin, upload_run)
            assert done["status"] == "succeeded" and done["rows_read"] == 2 and done["inserted"] == 2, done
            page.goto(server.base + "/")
            expect(page.get_by_role("row").filter(has_text="acme-invoices").get_by_role("button", name=re.compile("Sync"))).to_have_count(1)
            ctx.close()
            browser.close()
    except Exception:
        print(server.log(), file=sys.stderr)
        raise
    finally:
        server.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--warehouse", choices=["sqlite", "postgres"], action="append", required=True)
    parser.add_argument("--shots", required=True)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--axe", required=True, help="axe-core's axe.min.js")
    args = parser.parse_args()
    os.makedirs(args.shots, exist_ok=True)
    for w in args.warehouse:
        print(f"console in a browser, {w} warehouse:", flush=True)
        run(args.binary, w, args.shots, args.chromium, args.axe)
    print(f"console: all steps passed; screenshots in {args.shots}")


if __name__ == "__main__":
    main()
