"""The inference package against the training-time model.

* every registered CTR model and multi-task head: the package's scores of dataset rows
  (its exported program through the row-input path ``trainer.predict`` uses; raw CSV through
  the stored preprocessing for DeepFM) equal the task wrapper's in-process scores (atol 1e-5);
* HSTU / SASRec: the package's user vectors equal the eager model's last-position outputs, and
  its top-K equals brute force over the model's item table with history and padding excluded;
  FAISS (IVF-Flat, HNSW) recall@10 >= 0.95 against exact on a synthetic catalogue;
* the package loads and scores in a subprocess where shardrec cannot be imported;
* a corrupted package file is refused by its checksum, naming the file;
* row-wise int8 / int4 tables dequantise within half a step of the fp32 weights.

Models are randomly initialised (embeddings spread so scores differ): equality of two paths
needs no training. ``tests/integration`` trains and exports real checkpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from data.reader import ParquetReader, split_files
from data.schema import Schema
from models import get_model_spec, list_models
from trainer.tasks.ctr import CTRTrain
from trainer.tasks.multitask import MultiTaskTrain
from trainer.package import PackageError, load_package, write_package
from trainer.predict import main as predict_main
from trainer.topk import ann_topk, build_index, exact_topk, recall_at_k


def _model(name: str, data: str, flavour: str = "default", **args: Any
           ) -> Tuple[torch.nn.Module, str, Schema]:
    schema = Schema.load(data)
    spec = get_model_spec(name)
    torch.manual_seed(0)
    model = spec.build(schema, spec.make_args(flavour, args), "cpu").eval()
    with torch.no_grad():  # embeddings far from zero, so the scores spread
        for n, p in model.named_parameters():
            if "embedding" in n and p.dim() == 2:
                p.uniform_(-0.5, 0.5)
    return model, spec.task, schema


def _package(model: torch.nn.Module, task: str, schema: Schema, name: str, out: str,
             **kw: Any) -> Dict[str, Any]:
    return write_package(model, task, schema, "", out, model_name=name, compile="none", **kw)


def _split(data: str) -> str:
    return "eval" if os.path.isdir(os.path.join(data, "eval")) else "test"


def _scoring_cases() -> List[Tuple[str, str, Dict[str, Any]]]:
    """(model, dataset fixture, args) for every registered CTR and multi-task model, so a
    model added to the registry is covered without editing this test: CTR models on the
    behaviour-sequence CTR data (sparse + sequence features: every CTR model builds on it),
    multi-task heads on the two-task data over the small backbone."""
    out: List[Tuple[str, str, Dict[str, Any]]] = []
    for name in list_models():
        spec = get_model_spec(name)
        if spec.task == "ctr":  # the small flavour where there is one: export is the cost
            out.append((name, "tiny_seq",
                        {"flavour": "small"} if "small" in spec.flavours else {}))
        elif spec.task == "multitask":
            out.append((name, "tiny_ctr2", {"backbone_flavour": "small"}))
    return out


SCORING_CASES = _scoring_cases()


def _training_time_scores(model: torch.nn.Module, task: str, schema: Schema, data: str,
                          split: str) -> np.ndarray:
    """Scores ``[N, P]`` of every row (by sample id) through the task wrapper the trainer
    runs."""
    wrapper = (CTRTrain(model) if task == "ctr" else MultiTaskTrain(model)).eval()
    want: List[np.ndarray] = []
    ids: List[np.ndarray] = []
    with torch.no_grad():
        # remainder="pad" wraps the last batch to the first rows: placed by sample id below.
        for batch in ParquetReader(data, split, 512, schema=schema, remainder="pad"):
            ids.append(batch.sample_ids.numpy())
            if task == "ctr":
                want.append(torch.sigmoid(wrapper(batch)[1][1]).numpy()[:, None])
            else:
                logits = wrapper(batch)[1][1]
                binary = torch.tensor([p.kind == "binary" for p in wrapper.predictions])
                want.append(torch.where(binary, torch.sigmoid(logits), logits).numpy())
    expected = np.zeros((int(np.concatenate(ids).max()) + 1, want[0].shape[1]), np.float32)
    expected[np.concatenate(ids)] = np.concatenate(want)
    return expected


@pytest.mark.parametrize("name,dataset,args", SCORING_CASES, ids=[c[0] for c in SCORING_CASES])
def test_package_scores_equal_training_time_model(name: str, dataset: str, args: Dict[str, Any],
                                                  request: pytest.FixtureRequest,
                                                  tmp_path: Path) -> None:
    """Every registered CTR model and multi-task head: the package (its ``torch.export``
    program, loaded back from disk, fed through the package's row-input path) scores the
    split's rows as the task wrapper the trainer runs does (atol 1e-5)."""
    from trainer.package import run_inputs, table_inputs

    assert {"deepfm", "din", "dien", "mmoe"} <= {c[0] for c in SCORING_CASES}
    data = request.getfixturevalue(dataset)
    model, task, schema = _model(name, data, **args)
    out = str(tmp_path / "pkg")
    info = _package(model, task, schema, name, out)
    split = _split(data)
    expected = _training_time_scores(model, task, schema, data, split)
    pkg = load_package(out, prefer_compiled=False)
    tab = pq.read_table(split_files(data, split)[0])  # sample id = row of the first file
    got = run_inputs(pkg, table_inputs(pkg, tab)).numpy()
    n = tab.num_rows
    assert got.shape == (n, len(info["outputs"])) and n <= expected.shape[0]
    np.testing.assert_allclose(got, expected[:n], atol=1e-5, rtol=0)
    assert expected.std() > 1e-3  # the comparison is not between constants
    # One row alone: a program exported from a 512-row example must not have specialised
    # (or guarded) its batch size (a fused lookup once failed a guard at B = 1).
    one = run_inputs(pkg, table_inputs(pkg, tab.slice(n - 1, 1))).numpy()
    np.testing.assert_allclose(one, expected[n - 1:n], atol=1e-5, rtol=0)


def test_package_scores_raw_csv_through_stored_preprocessing(tmp_path: Path) -> None:
    """A user's CSV converted by ``data.convert csv`` (standardize, bucketize, vocabularies,
    hashing, a passthrough id): the package scores the raw CSV rows (labelled or not) as the
    training-time model scores the converted rows, matched by the passthrough ``req_id``."""
    from data.convert.__main__ import main as convert_main
    from tests.own_data import write_mixed_csv, write_spec
    from trainer.package import dataset_preprocess_state

    raw = str(tmp_path / "x.csv")
    write_mixed_csv(raw, rows=400)
    write_spec(str(tmp_path / "spec.json"))
    data = str(tmp_path / "ds")
    assert convert_main(["csv", raw, "--out", data, "--spec", str(tmp_path / "spec.json"),
                         "--no-progress"]) == 0
    model, task, schema = _model("deepfm", data)
    out = str(tmp_path / "pkg")
    _package(model, task, schema, "deepfm", out, preprocess=dataset_preprocess_state(data))
    expected = _training_time_scores(model, task, schema, data, "test")
    test_ids = [r for f in split_files(data, "test")
                for r in pq.read_table(f, columns=["req_id"]).column("req_id").to_pylist()]
    want = {rid: float(expected[k, 0]) for k, rid in enumerate(test_ids)}
    unlabelled = str(tmp_path / "new.csv")
    write_mixed_csv(unlabelled, rows=400, labelled=False)
    for rows_file in (raw, unlabelled):
        preds = str(tmp_path / "preds.parquet")
        assert predict_main(["--package", out, "--input", rows_file, "--out", preds,
                             "--chunk-rows", "128"]) == 0
        got = pq.read_table(preds).to_pydict()
        assert got["row"] == list(range(400))
        pairs = [(s, want[r]) for r, s in zip(got["req_id"], got["score"]) if r in want]
        assert len(pairs) == len(test_ids) > 10
        np.testing.assert_allclose(*map(np.array, zip(*pairs)), atol=1e-5, rtol=0)
    # A raw file that lacks a feature column: refused naming it.
    bad = str(tmp_path / "bad.csv")
    with open(raw) as fh, open(bad, "w") as gh:
        for line in fh:
            gh.write(",".join(line.rstrip("\n").split(",")[:-1]) + "\n")
    assert predict_main(["--package", out, "--input", bad, "--out", preds]) == 2


def _eager_users(model: torch.nn.Module, data: str, schema: Schema, rows: int
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(last-position user vectors [B, D], history ids, lengths) of the first ``rows`` rows
    through the eager model, as training runs it (negatives feature added by the data path)."""
    from trainer.tasks.sequential import SequentialBatches

    tr = SequentialBatches(model.item_feature, model.num_items, 4, 0, holdout=False)
    batch = tr(next(iter(ParquetReader(data, _split(data), rows, schema=schema))))
    with torch.no_grad():
        enc = model(batch)
    hist = batch.sequence[model.item_feature]
    return enc.user[enc.offsets[1:] - 1], hist.values(), hist.lengths().long()


@pytest.fixture(scope="module")
def hstu_package(tiny_nextitem: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An HSTU package (random weights, HNSW index) on ``tiny_nextitem``, shared by the
    top-K and HTTP tests."""
    model, task, schema = _model("hstu", tiny_nextitem)
    out = str(tmp_path_factory.mktemp("hstu") / "pkg")
    _package(model, task, schema, "hstu", out, index="hnsw")
    return out


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
def test_sequential_package_topk_equals_brute_force(name: str, tiny_nextitem: str,
                                                    tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    """Brute force over the unsharded model's table; ``tests/integration/test_train_hstu``
    does the same on a 2-rank run's sharded checkpoint."""
    model, task, schema = _model(name, tiny_nextitem)
    if name == "hstu":
        out = request.getfixturevalue("hstu_package")  # the same seed: the same weights
    else:
        out = str(tmp_path / "pkg")
        _package(model, task, schema, name, out)
    rows = 64
    users, hist_ids, hist_len = _eager_users(model, tiny_nextitem, schema, rows)
    assert bool((hist_len > 0).all())
    inp = str(tmp_path / "rows.parquet")
    pq.write_table(pq.read_table(split_files(tiny_nextitem, _split(tiny_nextitem))[0])
                   .slice(0, rows), inp)
    k = 10
    for search in ("exact", "ann") if name == "hstu" else ("exact",):
        preds = str(tmp_path / f"top_{search}.parquet")
        assert predict_main(["--package", out, "--input", inp, "--out", preds,
                             "--top-k", str(k), "--search", search]) == 0
        got = pq.read_table(preds)
        ids = torch.tensor(got.column("items").to_pylist())
        # Brute force over the model's own item table (normalised), history and row 0 out.
        items = F.normalize(model.ec.embeddings[model.item_table].weight.detach(), dim=-1)
        full = users @ items.T
        full[:, 0] = -torch.inf
        row = torch.repeat_interleave(torch.arange(rows), hist_len)
        full[row, hist_ids] = -torch.inf
        brute = full.topk(k, dim=1).indices
        if search == "exact":
            assert torch.equal(ids, brute)
            np.testing.assert_allclose(np.array(got.column("scores").to_pylist()),
                                       full.topk(k, dim=1).values.numpy(), atol=1e-5)
        else:
            assert recall_at_k(ids, brute) >= 0.95
    pkg = load_package(out)
    np.testing.assert_allclose(pkg.items.numpy(), items.numpy(), atol=1e-6)


@pytest.mark.parametrize("kind,params", [("ivf_flat", {"nlist": 64, "nprobe": 16}),
                                         ("hnsw", {"M": 16, "efConstruction": 64, "efSearch": 128})])
def test_ann_recall_at_10_on_synthetic_catalogue(kind: str, params: Dict[str, int]) -> None:
    """10k clustered item vectors, 200 users near some items: ANN recall@10 >= 0.95 against
    the exact blocked top-K, which itself equals a full sort."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(64, 32, generator=g)
    items = F.normalize(centres[torch.randint(0, 64, (10_000,), generator=g)]
                        + 0.5 * torch.randn(10_000, 32, generator=g), dim=-1)
    users = F.normalize(items[torch.randint(1, 10_000, (200,), generator=g)]
                        + 0.3 * torch.randn(200, 32, generator=g), dim=-1)
    hist_len = torch.full((200,), 3)
    hist_ids = torch.randint(1, 10_000, (600,), generator=g)
    s, i = exact_topk(users, items, 10, hist_ids, hist_len, block=4096)
    full = users @ items.T
    full[:, 0] = -torch.inf
    full[torch.repeat_interleave(torch.arange(200), 3), hist_ids] = -torch.inf
    assert torch.equal(i, full.topk(10, dim=1).indices)
    index = build_index(items, kind, params)
    _, ai = ann_topk(index, users, 10, hist_ids, hist_len)
    assert not bool(torch.isin(ai, torch.tensor([0])).any())
    assert recall_at_k(ai, i) >= 0.95


_NO_SHARDREC = r"""
import importlib.util, json, sys
# Started with -S (no site: no .pth files, so no editable install of shardrec) and cwd in a
# temporary directory; only the interpreter's site-packages (torch) is added.
sys.path.append(sys.argv[3])
for mod in ('trainer', 'models', 'sharding'):
    assert importlib.util.find_spec(mod) is None, (mod, importlib.util.find_spec(mod))
import torch
pkg, case = sys.argv[1], sys.argv[2]
prog = torch.export.load(pkg + '/model.pt2').module()
inp = torch.load(case, weights_only=True)
with torch.no_grad():
    out = prog(inp['dense'], inp['values'], inp['lengths'])
print(json.dumps({'max_diff': float((out - inp['expected']).abs().max()),
                  'shardrec': [m for m in ('trainer', 'models', 'sharding') if m in sys.modules],
                  'torchrec': 'torchrec' in sys.modules}))
"""


@pytest.fixture(scope="module")
def deepfm_package(tiny_ctr: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A DeepFM package (random weights) on ``tiny_ctr``, shared by the tests below."""
    model, task, schema = _model("deepfm", tiny_ctr)
    out = str(tmp_path_factory.mktemp("deepfm") / "pkg")
    _package(model, task, schema, "deepfm", out)
    return out


def test_package_loads_without_shardrec_and_refuses_corruption(deepfm_package: str,
                                                              tiny_ctr: str,
                                                              tmp_path: Path) -> None:
    import shutil

    out = str(tmp_path / "pkg")
    shutil.copytree(deepfm_package, out)
    pkg = load_package(out)
    tab = pq.read_table(split_files(tiny_ctr, _split(tiny_ctr))[0]).slice(0, 100)
    from trainer.package import table_inputs

    x = table_inputs(pkg, tab)
    expected = pkg.run(x.dense, x.values, x.lengths)
    case = str(tmp_path / "case.pt")
    torch.save({"dense": x.dense, "values": x.values, "lengths": x.lengths,
                "expected": expected}, case)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    site = os.path.dirname(os.path.dirname(torch.__file__))
    res = subprocess.run([sys.executable, "-S", "-c", _NO_SHARDREC, out, case, site],
                         cwd=str(tmp_path),
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["max_diff"] == 0.0 and got["shardrec"] == [] and not got["torchrec"]
    # One flipped byte in the program: refused by checksum, the file named.
    path = os.path.join(out, "model.pt2")
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(PackageError, match=r"model\.pt2 is corrupted"):
        load_package(out)
    assert predict_main(["--package", out, "--input", str(tmp_path / "x.parquet"),
                         "--out", str(tmp_path / "y.parquet")]) == 2


@pytest.mark.parametrize("quant,levels", [("int8", 255), ("int4", 15)])
def test_rowwise_quantised_tables(quant: str, levels: int) -> None:
    from trainer.inference import TableRows

    w = torch.randn(50, 12) * torch.linspace(0.1, 3, 50)[:, None]  # rows of different ranges
    t = TableRows(w, quant)
    step = (w.max(1).values - w.min(1).values) / levels
    err = (t.dequantised() - w).abs()
    assert bool((err <= step[:, None] / 2 + 1e-6).all())
    ids = torch.tensor([3, 3, 49, 0])
    assert torch.equal(t(ids), t.dequantised()[ids])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_server_scores_like_predict_rejects_bad_requests_and_stops_on_sigterm(
        deepfm_package: str, tiny_ctr: str, tmp_path: Path) -> None:
    """A real server process on 127.0.0.1 and a real HTTP client: 32 concurrent requests
    (micro-batched) return predict's scores; malformed requests get 400s naming the field;
    SIGTERM stops it cleanly (exit 0)."""
    import asyncio
    import signal
    import time

    import aiohttp

    tab = pq.read_table(split_files(tiny_ctr, _split(tiny_ctr))[0]).slice(0, 64)
    rows_file = str(tmp_path / "rows.parquet")
    pq.write_table(tab, rows_file)
    preds = str(tmp_path / "preds.parquet")
    assert predict_main(["--package", deepfm_package, "--input", rows_file, "--out", preds]) == 0
    want = pq.read_table(preds).column("score").to_numpy()
    schema = Schema.load(tiny_ctr)
    cols = [f.name for f in schema.dense_features + schema.sparse_features]
    rows = [{c: tab.column(c)[i].as_py() for c in cols} for i in range(tab.num_rows)]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trainer.serve", "--package", deepfm_package,
                             "--port", str(port), "--max-wait-ms", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    async def client() -> Tuple[List[Any], List[Tuple[int, Any]], Dict[str, Any]]:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            deadline = time.time() + 90
            while True:
                try:
                    async with session.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.poll() is None and time.time() < deadline, "server did not start"
                await asyncio.sleep(0.2)

            async def post(path: str, payload: Any) -> Tuple[int, Any]:
                async with session.post(url + path, json=payload) as r:
                    return r.status, await r.json()

            # Two rows per request, 32 requests at once.
            ok = await asyncio.gather(*[post("/score", {"rows": rows[2 * i:2 * i + 2]})
                                        for i in range(32)])
            bad_row = dict(rows[0])
            bad_row[cols[-1]] = "seven"
            missing = {c: v for c, v in rows[0].items() if c != cols[0]}
            bad = [await post("/score", {"rows": [rows[0], bad_row]}),
                   await post("/score", {"rows": [missing]}),
                   await post("/score", {"rowz": []}),
                   await post("/topk", {"rows": [rows[0]]})]
            async with session.get(url + "/health") as r:
                health = await r.json()
            return list(ok), bad, health

    try:
        ok, bad, health = asyncio.run(client())
        got = np.array([s["score"] for status, body in ok for s in body["scores"]])
        assert all(status == 200 for status, _ in ok)
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert health["batches"] < 32  # concurrent requests shared program calls
        assert [b[0] for b in bad] == [400, 400, 400, 400]
        assert bad[0][1]["field"] == f"rows[1].{cols[-1]}"
        assert bad[1][1]["field"] == f"rows[0].{cols[0]}"
        assert bad[2][1]["field"] == "rows"
        assert bad[3][1]["field"] == "path"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_topk_like_predict_and_rejects_bad_requests(hstu_package: str, tiny_nextitem: str,
                                                           tmp_path: Path) -> None:
    """``/topk`` of the HTTP app (in this process, on a real 127.0.0.1 socket, a real aiohttp
    client): 16 concurrent requests (exact) and one ANN request return what
    ``predict --top-k`` writes for the same rows; malformed requests get 400s naming the
    field."""
    import asyncio

    import aiohttp
    from aiohttp.test_utils import TestServer

    from trainer.serve import build_app

    rows_n, k = 32, 10
    tab = pq.read_table(split_files(tiny_nextitem, _split(tiny_nextitem))[0]).slice(0, rows_n)
    rows_file = str(tmp_path / "rows.parquet")
    pq.write_table(tab, rows_file)
    want = {}
    for search in ("exact", "ann"):
        preds = str(tmp_path / f"{search}.parquet")
        assert predict_main(["--package", hstu_package, "--input", rows_file, "--out", preds,
                             "--top-k", str(k), "--search", search]) == 0
        want[search] = pq.read_table(preds).to_pydict()
    rows = [{"item_seq": tab.column("item_seq")[i].as_py(),
             "item_ts": tab.column("item_ts")[i].as_py()} for i in range(rows_n)]
    pkg = load_package(hstu_package)
    assert pkg.info["inputs"]["timestamps"]

    async def client() -> Tuple[List[Any], Any, List[Tuple[int, Any]], Dict[str, Any]]:
        server = TestServer(build_app(pkg, max_wait_ms=20), host="127.0.0.1")
        await server.start_server()
        try:
            url = f"http://127.0.0.1:{server.port}"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:

                async def post(path: str, payload: Any) -> Tuple[int, Any]:
                    async with s.post(url + path, json=payload) as r:
                        return r.status, await r.json()

                exact = await asyncio.gather(*[
                    post("/topk", {"rows": rows[2 * i:2 * i + 2], "k": k}) for i in range(16)])
                ann = await post("/topk", {"rows": rows, "k": k, "search": "ann"})
                no_ts = {"item_seq": rows[0]["item_seq"]}
                bad = [await post("/topk", {"rows": [rows[0], {**rows[1], "item_seq": "x"}]}),
                       await post("/topk", {"rows": [no_ts]}),
                       await post("/topk", {"rows": rows[:1], "k": 0}),
                       await post("/topk", {"rows": rows[:1], "search": "fuzzy"}),
                       await post("/topk", {"rows": [{**rows[0], "item_seq": [10 ** 6]}]}),
                       await post("/score", {"rows": rows[:1]})]
                async with s.get(url + "/health") as r:
                    health = await r.json()
        finally:
            await server.close()
        return list(exact), ann, bad, health

    exact, ann, bad, health = asyncio.run(client())
    assert all(status == 200 for status, _ in exact) and ann[0] == 200
    got = [res for _, body in exact for res in body["results"]]
    assert [r["items"] for r in got] == want["exact"]["items"]
    np.testing.assert_allclose(np.array([r["scores"] for r in got]),
                               np.array(want["exact"]["scores"]), atol=1e-5)
    assert [r["items"] for r in ann[1]["results"]] == want["ann"]["items"]
    assert health["batches"] < 17  # concurrent requests shared program calls
    assert [b[0] for b in bad] == [400] * 6
    assert [b[1]["field"] for b in bad] == ["rows[1].item_seq", "rows[0].item_ts", "k",
                                            "search", "rows", "path"]
    assert "item_seq" in bad[4][1]["error"]  # the out-of-range id's column is named
