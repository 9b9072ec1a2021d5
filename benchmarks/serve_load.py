"""Load test of ``meddx serve`` over loopback: p50/p99 latency, throughput and errors.

Starts the real service (the ``meddx serve`` command, in a subprocess on 127.0.0.1) once per
backend (torch, ONNX fp32, ONNX INT8) and sends a bounded number of requests from ``C``
concurrent closed-loop clients:

* ``POST /v1/models/{name}/predict`` with a BreastMNIST PNG, without and with the heat map;
* a CDS Hooks ``patient-view`` call with the image in prefetch (JWT per call), without and with
  the heat map page behind the card's link;
* overload: ``2 × max_in_flight`` clients against a small admission limit — only 200/429/503
  may come back, and every accepted request must be in the audit log.

Writes ``benchmarks/results/serve_load.json`` and ``.md``. Client and server share the CPU, as
on a real 2-core box with its own load generator; the figures include the client's cost.

With ``--ehr-package`` (an ICU mortality package, e.g. ``runs/bench_icu/grud/model``) it runs
the EHR ``patient-view`` service instead: every call carries a full 48 h stay in prefetch
(Patient, in-progress Encounter, all Observations of one PhysioNet 2012 stay converted with
``physionet_to_bundle``; default the largest set-a stay, 1,494 Observations, ~1 MB of JSON),
without and with the explanation whose findings become the card's drivers; plus the
single-request CPU cost of each step in-process. Results go to ``serve_load_ehr.json``/``.md``.

    python benchmarks/serve_load.py --package runs/breast/model
    python benchmarks/serve_load.py --ehr-package runs/bench_icu/grud/model
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from _common import RESULTS, start_serve, stop_serve  # noqa: E402

ISS = "https://ehr.bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_images(n: int) -> list[bytes]:
    import io

    from PIL import Image

    from meddx.catalog import data_roots

    npz = next(r / "medmnist/breastmnist.npz" for r in data_roots()
               if (r / "medmnist/breastmnist.npz").is_file())
    with np.load(npz) as d:
        imgs = d["test_images"][:n]
    out = []
    for img in imgs:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class Service:
    """``meddx serve`` in a subprocess."""

    def __init__(self, package: Path, work: Path, backend: str, threads: int, workers: int,
                 max_in_flight: int, cds_explain: bool = True, prelude: str = "",
                 extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.audit = work / f"audit-{backend}-{max_in_flight}-{uuid.uuid4().hex[:6]}.jsonl"
        cmd = ["-q", "serve",
               str(package), "--port", str(self.port), "--public-url", self.base,
               "--api-key-file", str(work / "api-keys.json"), "--cds-jwks",
               str(work / "jwks.json"), "--cds-issuer", ISS, "--research-use",
               "--backend", backend, "--threads", str(threads), "--workers", str(workers),
               "--max-in-flight", str(max_in_flight), "--audit-log", str(self.audit),
               "--cds-explain" if cds_explain else "--no-cds-explain", *extra]
        self.proc = start_serve(cmd, self.base, threads, prelude=prelude)

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        stop_serve(self.proc)


class Reply:
    """What the scenarios need of a response: its status and, when asked, its JSON."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status_code = status
        self._body = body

    def json(self) -> Any:
        return json.loads(self._body)


class Client:
    """A light aiohttp load generator (httpx's async client costs the shared CPU ~3x more
    per request; client and server share the two cores here, so a lighter client measures
    the service rather than the load generator)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def post(self, url: str, headers: dict[str, str] | None = None,
                   files: dict[str, tuple[str, bytes, str]] | None = None,
                   json: Any = None, content: bytes | None = None) -> Reply:
        data: Any = content
        if files:
            data = aiohttp.FormData()
            for field, (filename, payload, ctype) in files.items():
                data.add_field(field, payload, filename=filename, content_type=ctype)
        async with self.session.post(url, headers=headers, data=data, json=json) as r:
            return Reply(r.status, await r.read())


async def run_load(make_request: Any, total: int, concurrency: int,
                   warmup: int = 4, server_cpu: Any = None) -> dict[str, Any]:
    """``concurrency`` closed-loop clients sending ``total`` requests in all, after ``warmup``
    requests (sent one at a time, not counted: the first calls of a scenario load what it
    needs, e.g. the explainer)."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    counter = iter(range(total))
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = Client(session)
        for i in range(warmup):
            await make_request(client, total + i)
        cpu0 = time.process_time()
        server0 = server_cpu() if server_cpu else 0.0

        async def worker() -> None:
            for i in counter:
                t = time.perf_counter()
                try:
                    r = await make_request(client, i)
                    code = r.status_code
                except (TimeoutError, aiohttp.ClientError):
                    code = -1
                lat.append(time.perf_counter() - t)
                codes[code] = codes.get(code, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - start
    arr = np.asarray(lat) * 1000
    return {"requests": total, "concurrency": concurrency, "status": codes,
            "errors": sum(v for k, v in codes.items() if k != 200),
            "p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "throughput_rps": total / wall,
            "client_cpu_ms_per_request": 1000 * (time.process_time() - cpu0) / total,
            **({"server_cpu_ms_per_request": 1000 * (server_cpu() - server0) / total}
               if server_cpu else {})}


def keys(work: Path) -> tuple[str, Any]:
    from joserfc.jwk import ECKey

    from meddx.serving.auth import new_api_key

    token, digest = new_api_key("bench")
    (work / "api-keys.json").write_text(json.dumps({"keys": [{"id": "bench", "sha256": digest}]}))
    key = ECKey.generate_key("P-384", parameters={"kid": "bench-1"}, private=True)
    (work / "jwks.json").write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    return token, key


def jwt_for(key: Any, aud: str) -> str:
    from joserfc import jwt

    now = int(time.time())
    return jwt.encode({"alg": "ES384", "kid": "bench-1", "typ": "JWT"},
                      {"iss": ISS, "sub": "bench", "aud": aud, "iat": now, "exp": now + 300,
                       "jti": str(uuid.uuid4())}, key, algorithms=["ES384"])


def scenarios(svc: Service, name: str, token: str, key: Any, pngs: list[bytes],
              n: int, c: int, heat_n: int, cds_heat: bool) -> dict[str, Any]:
    """REST predict (with and without heat map) and a CDS call; with ``cds_heat`` only the
    CDS call (the service then renders heat maps behind the cards' links)."""
    auth = {"Authorization": f"Bearer {token}"}
    url = f"{svc.base}/v1/models/{name}/predict"

    def predict(explain: bool):
        async def req(client: Client, i: int) -> Reply:
            return await client.post(url + ("?explain=true" if explain else ""), headers=auth,
                                     files={"file": ("x.png", pngs[i % len(pngs)], "image/png")})
        return req

    cds_url = f"{svc.base}/cds-services/{name}"
    tokens = [jwt_for(key, cds_url) for _ in range(n + 8)]  # + warm-up
    bodies = [{"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
               "context": {"userId": "Practitioner/1", "patientId": "p1"},
               "prefetch": {"documents": None, "media": {
                   "resourceType": "Media", "status": "completed",
                   "content": {"contentType": "image/png",
                               "data": base64.b64encode(pngs[i % len(pngs)]).decode()}}}}
              for i in range(len(pngs))]

    async def cds(client: Client, i: int) -> Reply:
        return await client.post(cds_url, json=bodies[i % len(bodies)],
                                 headers={"Authorization": f"Bearer {tokens[i]}"})

    def measured(make: Any, total: int) -> dict[str, Any]:
        return asyncio.run(run_load(make, total, c, server_cpu=svc.cpu_s))

    if cds_heat:
        return {"cds patient-view + heat map": measured(cds, heat_n)}
    return {"predict": measured(predict(False), n),
            "predict + heat map": measured(predict(True), heat_n),
            "cds patient-view": measured(cds, n)}


def overload(package: Path, work: Path, name: str, token: str, pngs: list[bytes],
             limit: int, n: int, threads: int, workers: int) -> dict[str, Any]:
    svc = Service(package, work, "onnx", threads, workers, limit)
    try:
        auth = {"Authorization": f"Bearer {token}"}

        async def req(client: Client, i: int) -> Reply:
            return await client.post(f"{svc.base}/v1/models/{name}/predict", headers=auth,
                                     files={"file": ("x.png", pngs[i % len(pngs)], "image/png")})

        res = asyncio.run(run_load(req, n, 2 * limit, warmup=0))  # every request counted
    finally:
        svc.stop()
    lines = [json.loads(x) for x in svc.audit.read_text().splitlines()]
    accepted = res["status"].get(200, 0)
    res.update(max_in_flight=limit,
               only_200_429_503=set(res["status"]) <= {200, 429, 503},
               audited_predictions=sum(1 for x in lines if x["event"] == "predict"),
               accepted=accepted)
    res["every_accepted_audited"] = res["audited_predictions"] == accepted
    return res


def write(result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(result, indent=2))
    lines = ["# meddx serve under load (loopback)", "",
             f"{result['setup']}", "",
             "| backend | scenario | requests | clients | p50 ms | p99 ms | req/s | errors "
             "| server CPU ms/request | client CPU ms/request |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for backend, rows in result["backends"].items():
        for scen, r in rows.items():
            lines.append(f"| {backend} | {scen} | {r['requests']} | {r['concurrency']} | "
                         f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput_rps']:.1f} | "
                         f"{r['errors']} | {r['server_cpu_ms_per_request']:.1f} | "
                         f"{r['client_cpu_ms_per_request']:.1f} |")
    o = result["overload"]
    lines += ["", f"Overload: {o['concurrency']} clients against max-in-flight {o['max_in_flight']}"
              f": status counts {o['status']}; only 200/429/503: {o['only_200_429_503']}; "
              f"accepted {o['accepted']}, audited {o['audited_predictions']} "
              f"(every accepted request audited: {o['every_accepted_audited']}).", "",
              f"Target p99 ≤ 100 ms at 16 clients without heat maps: best p99 "
              f"{result['best_p99_ms']:.1f} ms ({result['best_backend']}).", "",
              "Server CPU ms/request is the service's own CPU time (all threads) per request; "
              "on two otherwise idle cores it bounds throughput at about 2000 / that figure "
              "requests per second.", "",
              "Reproduce: `python benchmarks/serve_load.py --package runs/breast/model`"]
    (RESULTS / "serve_load.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------- EHR
def ehr_prefetch(stay: Path) -> tuple[str, dict[str, Any], int]:
    """A PhysioNet 2012 stay as CDS Hooks prefetch: (patient id, prefetch, Observations)."""
    from meddx.modalities.ehr.fhir import physionet_to_bundle

    res = [e["resource"] for e in physionet_to_bundle(stay)["entry"]]
    patient = next(r for r in res if r["resourceType"] == "Patient")
    enc = next(r for r in res if r["resourceType"] == "Encounter")
    obs = [r for r in res if r["resourceType"] == "Observation"]

    def searchset(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "searchset", "total": len(items),
                "entry": [{"resource": r} for r in items]}

    return patient["id"], {"patient": patient, "encounter": searchset([enc]),
                           "observations": searchset(obs)}, len(obs)


def ehr_steps(package: Path, body: bytes, repeats: int = 10) -> tuple[dict[str, float], float]:
    """CPU ms of each step of one EHR patient-view call, in-process on one thread, and the
    size of the answer in KB."""
    import torch

    from meddx.inference import load_model
    from meddx.serving.cards import build_card
    from meddx.serving.cds import adapter_for
    from meddx.serving.engine import ServedModel, tune_gc
    from meddx.serving.routers.cds_hooks import _parse_hook
    from meddx.serving.settings import ServeSettings

    torch.set_num_threads(1)
    served = ServedModel(load_model(package, backend="torch"),
                         ServeSettings(research_use=True, warmup=False))
    adapter = adapter_for("ehr")
    served.predictor.explainer()  # loaded before the freeze, as the service's warm-up does
    import gc

    gc.collect()
    gc.freeze()  # as the service does after warm-up (see ModelHub.warmup)
    tune_gc()
    req = _parse_hook(body)
    hook = adapter.inputs(req, req.prefetch, served.card)

    def card(a: Any) -> dict[str, Any]:
        return build_card(a.prediction, served, critical_risk=0.8, link=None,
                          subject="Patient/x", notes=[], basis=[], risk_card=True,
                          summary=adapter.summary(a.prediction, served.card),
                          extra_lines=adapter.detail_lines(a.prediction, served.card))

    steps = {
        "parse request (orjson + model)": lambda: _parse_hook(body),
        "read stay (FHIR fast path + features)": lambda: served.predictor.read(hook.sources[0]),
        "read + predict": lambda: served.answer_sources(hook.sources, hook.digests),
        "read + predict + explain": lambda: served.answer_sources(hook.sources, hook.digests,
                                                                  explain=True),
    }
    out: dict[str, float] = {}
    for name, fn in steps.items():
        fn()
        t = time.process_time()
        for _ in range(repeats):
            result = fn()
        out[name] = 1000 * (time.process_time() - t) / repeats
    answer = result[0]
    card(answer)  # the first card imports and builds the R4B models: not a per-call cost
    t = time.process_time()
    for _ in range(repeats):
        c = card(answer)
    out["card + RiskAssessment (validated)"] = 1000 * (time.process_time() - t) / repeats
    return out, len(json.dumps({"cards": [c]})) / 1024


def ehr_scenarios(svc: Service, name: str, key: Any, patient_id: str, prefetch: dict[str, Any],
                  n: int, c: int) -> dict[str, Any]:
    url = f"{svc.base}/cds-services/{name}"
    tokens = [jwt_for(key, url) for _ in range(n + 8)]  # + warm-up
    body = json.dumps({"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
                       "context": {"userId": "Practitioner/1", "patientId": patient_id},
                       "prefetch": prefetch}).encode()  # encoded once: the client stays cheap
    cards: list[int] = []

    async def cds(client: Client, i: int) -> Reply:
        r = await client.post(url, content=body, headers={
            "Authorization": f"Bearer {tokens[i]}", "Content-Type": "application/json"})
        if r.status_code == 200 and i < n:  # warm-up calls (i >= n) are not counted
            cards.append(len(r.json()["cards"]))
        return r

    res = asyncio.run(run_load(cds, n, c, server_cpu=svc.cpu_s))
    res["answers_with_one_card"] = sum(1 for k in cards if k == 1)
    res["request_kb"] = len(body) / 1024
    return res


def run_ehr(args: argparse.Namespace) -> None:
    from meddx.catalog import data_roots
    from meddx.package import load_package

    stay = next(r / "ehr/physionet2012" / args.ehr_stay for r in data_roots()
                if (r / "ehr/physionet2012" / args.ehr_stay).is_file())
    patient_id, prefetch, n_obs = ehr_prefetch(stay)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        package = work / "model"
        shutil.copytree(args.ehr_package, package)
        name = load_package(package).card.name
        _, key = keys(work)
        body = json.dumps({"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
                           "context": {"patientId": patient_id}, "prefetch": prefetch}).encode()
        steps, response_kb = ehr_steps(package, body)
        result: dict[str, Any] = {"package": str(args.ehr_package), "stay": args.ehr_stay,
                                  "observations": n_obs, "scenarios": {},
                                  "steps_cpu_ms": steps, "response_kb": response_kb}
        print("steps", json.dumps({k: round(v, 1) for k, v in result["steps_cpu_ms"].items()}),
              flush=True)
        for explain, n in ((False, args.requests), (True, args.heat_requests)):
            svc = Service(package, work, "torch", args.threads, args.workers, 64, explain)
            try:  # one client (the latency of a call) then C clients (under load)
                for c, total in ((1, args.serial_requests), (args.concurrency, n)):
                    row = ehr_scenarios(svc, name, key, patient_id, prefetch, total, c)
                    label = ("patient-view + drivers (explain)" if explain
                             else "patient-view, no drivers") + f", {c} client(s)"
                    result["scenarios"][label] = row
                    print(label, round(row["p50_ms"], 1), round(row["p99_ms"], 1),
                          row["errors"], round(row["server_cpu_ms_per_request"], 1), flush=True)
            finally:
                svc.stop()
        # same-run baseline: the service as it was before engine.tune_gc (Python's 700, 10, 10)
        svc = Service(package, work, "torch", args.threads, args.workers, 64, True,
                      prelude="import meddx.serving.engine as e; e.tune_gc = lambda: None; ")
        try:
            row = ehr_scenarios(svc, name, key, patient_id, prefetch, args.serial_requests, 1)
            label = "patient-view + drivers (explain), 1 client(s), Python's default GC thresholds"
            result["scenarios"][label] = row
            print(label, round(row["p50_ms"], 1), round(row["p99_ms"], 1), row["errors"],
                  round(row["server_cpu_ms_per_request"], 1), flush=True)
        finally:
            svc.stop()
    result["setup"] = (f"{args.concurrency} clients, {args.workers} workers × {args.threads} "
                       f"thread(s), torch backend, {os.cpu_count()} CPUs visible; {args.note}")
    write_ehr(result)


def write_ehr(result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load_ehr.json").write_text(json.dumps(result, indent=2))
    lines = ["# EHR CDS Hooks patient-view under load (loopback)", "",
             f"{result['setup']}", "",
             f"Package `{result['package']}`; prefetch = PhysioNet 2012 stay "
             f"`{result['stay']}` as FHIR ({result['observations']} Observations, "
             f"{next(iter(result['scenarios'].values()))['request_kb']:.0f} KB per request, "
             f"{result['response_kb']:.0f} KB per answer: the RiskAssessment's basis lists "
             "every Observation used).",
             "", "| scenario | requests | clients | p50 ms | p99 ms | req/s | errors | "
             "one card | server CPU ms/request | client CPU ms/request |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for scen, r in result["scenarios"].items():
        lines.append(f"| {scen} | {r['requests']} | {r['concurrency']} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['throughput_rps']:.1f} | {r['errors']} | "
                     f"{r['answers_with_one_card']} | {r['server_cpu_ms_per_request']:.1f} | "
                     f"{r['client_cpu_ms_per_request']:.1f} |")
    lines += ["", "CPU ms of one call, in-process, one thread (each step measured alone; "
              "'read + predict' includes the read):", "", "| step | CPU ms |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["steps_cpu_ms"].items()]
    lines += ["", "The service collects the young generation every 10,000 net allocations after "
              "warm-up (engine.tune_gc); the last row is the same service with Python's default "
              "thresholds (700, 10, 10), measured in the same run."]
    lines += ["", "Target (issue 7): p99 ≤ 100 ms on 2 cores. Server CPU ms/request is the "
              "service's own CPU time per call (all threads, including HTTP and JWT checks); "
              "on two otherwise idle cores throughput is bounded at about 2000 / that figure "
              "calls per second.", "",
              "Reproduce: `python benchmarks/serve_load.py --ehr-package "
              "runs/bench_icu/grud/model`"]
    (RESULTS / "serve_load_ehr.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, help="an image package (BreastMNIST)")
    ap.add_argument("--ehr-package", type=Path, help="an ICU mortality package: EHR scenario")
    ap.add_argument("--ehr-stay", default="set-a/135365.txt",
                    help="PhysioNet 2012 stay sent in prefetch (default: the largest of set-a)")
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--heat-requests", type=int, default=64)
    ap.add_argument("--serial-requests", type=int, default=200,
                    help="EHR: requests sent by a single client (latency of one call; p99 of "
                         "40 would be little more than their maximum)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--overload-limit", type=int, default=8)
    ap.add_argument("--backends", default="torch,onnx,onnx-int8")
    ap.add_argument("--note", default="2-core VM shared with other jobs")
    args = ap.parse_args()
    if not args.package and not args.ehr_package:
        ap.error("give --package (images) and/or --ehr-package (EHR patient-view)")
    if args.ehr_package:
        run_ehr(args)
    if args.package:
        run_images(args)


def run_images(args: argparse.Namespace) -> None:
    from meddx.inference.onnx import INT8_FILE, export_onnx
    from meddx.package import load_package

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        package = work / "model"
        shutil.copytree(args.package, package)
        if not (package / INT8_FILE).is_file():
            export_onnx(package, int8=True)
        name = load_package(package).card.name
        token, key = keys(work)
        pngs = png_images(32)
        result: dict[str, Any] = {"backends": {}, "package": str(args.package)}
        for backend in args.backends.split(","):
            for heat in (False, True):
                svc = Service(package, work, backend, args.threads, args.workers, 64, heat)
                try:
                    rows = scenarios(svc, name, token, key, pngs, args.requests,
                                     args.concurrency, args.heat_requests, heat)
                finally:
                    svc.stop()
                result["backends"].setdefault(backend, {}).update(rows)
                print(backend, json.dumps({k: (round(v["p50_ms"], 1), round(v["p99_ms"], 1),
                                               v["errors"]) for k, v in rows.items()}),
                      flush=True)
        result["overload"] = overload(package, work, name, token, pngs, args.overload_limit,
                                      args.requests // 2, args.threads, args.workers)
    best = min(((b, r["predict"]["p99_ms"]) for b, r in result["backends"].items()),
               key=lambda x: x[1])
    result.update(best_backend=best[0], best_p99_ms=best[1],
                  setup=f"{args.concurrency} clients, {args.workers} workers × {args.threads} "
                        f"thread(s), {os.cpu_count()} CPUs visible; {args.note}")
    write(result)


if __name__ == "__main__":
    main()
