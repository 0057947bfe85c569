"""Caches in an S3 bucket: a real S3-compatible server (moto in server mode) on 127.0.0.1, talked to only through
the real clients (s3fs for the pipeline, boto3 for the test's own checks). Credentials and endpoint reach the
pipeline the way a user's would: AWS_* environment variables (or --storage-option).

Skipped, with the reason, where moto[server] or s3fs is not installed (both are in the `dev` extra)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

pytest.importorskip("s3fs", reason="s3fs not installed (pip install -e '.[dev]')")
moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed (pip install -e '.[dev]')")

from kd_pipeline.cache.build import CacheConfig, cache_teacher  # noqa: E402
from kd_pipeline.cache.format.lock import hold_lease  # noqa: E402
from kd_pipeline.cache.format.manifest import load_cache  # noqa: E402
from kd_pipeline.cache.format.reading import read_all  # noqa: E402
from kd_pipeline.cache.format.storage import open_store, parse_storage_options  # noqa: E402
from kd_pipeline.cache.format.verify import verify_cache  # noqa: E402
from kd_pipeline.errors import CacheError, ConfigError, LockHeld  # noqa: E402
from kd_pipeline.pipeline import app  # noqa: E402

K, SEQ_LEN = 8, 32
SECRET = "testing-secret-must-never-be-printed"


def _start_server():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # else one stderr line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: a free one
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@pytest.fixture(scope="module")
def s3_endpoint():
    try:
        server, endpoint = _start_server()
    except OSError as e:  # no loopback sockets here
        pytest.skip(f"cannot start a moto S3 server on 127.0.0.1: {e}")
    yield endpoint
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Credentials and endpoint through the environment only, for this process and its children."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.aws profile can interfere
    return s3_endpoint


@pytest.fixture
def bucket(s3_env):
    import boto3

    name = f"kd-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def _client():
    import boto3

    return boto3.client("s3")


def _objects(bucket: str, prefix: str) -> dict[str, bytes]:
    c = _client()
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
    return {k[len(prefix) + 1 :]: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _cache_objects(bucket: str, prefix: str) -> dict[str, bytes]:
    """Shards and manifests, as tests/test_cache.py's cache_bytes compares them."""
    return {k: v for k, v in _objects(bucket, prefix).items() if k.startswith("shards/") or k.startswith("manifest")}


def _local_cache_bytes(root: Path) -> dict[str, bytes]:
    files = sorted((root / "shards").glob("*.parquet")) + sorted(root.glob("manifest*.json"))
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in files}


def _config(teacher, data, out, **kw) -> CacheConfig:
    base = dict(
        teacher=str(teacher),
        data=str(data),
        out=str(out),
        top_k=K,
        seq_len=SEQ_LEN,
        batch_size=4,
        shard_tokens=SEQ_LEN * 6,
        row_group_tokens=SEQ_LEN * 4,
        max_sequences=30,
        progress=False,
    )
    return CacheConfig(**{**base, **kw})


def _cli_args(teacher, data, out, sequences) -> list[str]:
    return [
        "cache-teacher",
        "--teacher",
        str(teacher),
        "--data",
        str(data),
        "--out",
        out,
        "--top-k",
        str(K),
        "--seq-len",
        str(SEQ_LEN),
        "--batch-size",
        "4",
        "--shard-tokens",
        str(SEQ_LEN * 6),
        "--row-group-tokens",
        str(SEQ_LEN * 4),
        "--max-sequences",
        str(sequences),
        "--no-progress",
    ]


def test_storage_options_parse_json_values_and_nest():
    assert parse_storage_options(["anon=true", "profile=lab", "simplecache.cache_storage=/tmp/c", "n=3"]) == {
        "anon": True,
        "profile": "lab",
        "simplecache": {"cache_storage": "/tmp/c"},
        "n": 3,
    }
    with pytest.raises(ConfigError, match="KEY=VALUE") as e:
        parse_storage_options([f"secret{SECRET}"])
    assert SECRET not in str(e.value)


def test_cache_teacher_verify_distill_on_s3(
    tmp_path, monkeypatch, s3_env, bucket, teacher_dir, corpus_jsonl, student_config
):
    """The README's pipeline with the cache in a bucket: the same bytes as a local cache, verify OK, distill runs."""
    url = f"s3://{bucket}/caches/run1"
    runner = CliRunner()
    built = runner.invoke(app, _cli_args(teacher_dir, corpus_jsonl, url, 30))
    assert built.exit_code == 0, built.output
    local = tmp_path / "local"
    cache_teacher(_config(teacher_dir, corpus_jsonl, local))
    assert _cache_objects(bucket, "caches/run1") == _local_cache_bytes(local)  # 5 shards + manifest, byte for byte
    assert len(_cache_objects(bucket, "caches/run1")) == 6
    objects = _objects(bucket, "caches/run1")
    assert not [k for k in objects if "writer" in k]  # the lease is released
    assert any(k.startswith("tokenizer/") for k in objects)
    assert _client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    ok = runner.invoke(app, ["verify", url])
    assert ok.exit_code == 0, ok.output
    assert "OK: 5 shards, 30 sequences" in ok.output
    inspected = runner.invoke(app, ["inspect", url, "--seq", "7"])
    assert inspected.exit_code == 0, inspected.output
    assert "seq 7, position" in inspected.output and "complete" in inspected.output

    rows = read_all(url)
    local_rows = read_all(local)
    assert (rows.topk_ids == local_rows.topk_ids).all() and (rows.seq_ids == local_rows.seq_ids).all()

    # the endpoint as a --storage-option instead of AWS_ENDPOINT_URL
    with monkeypatch.context() as m:
        m.delenv("AWS_ENDPOINT_URL")
        ok = runner.invoke(app, ["verify", url, "--quick", "--storage-option", f"endpoint_url={s3_env}"])
    assert ok.exit_code == 0, ok.output

    run = tmp_path / "run"
    trained = runner.invoke(
        app,
        [
            "distill",
            "--student",
            str(student_config),
            "--cache",
            url,
            "--out",
            str(run),
            "--loss",
            "fkl",
            "--batch-size",
            "4",
            "--max-steps",
            "6",
            "--eval-every",
            "6",
            "--eval-sequences",
            "6",
            "--save-every",
            "6",
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert trained.exit_code == 0, trained.output
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval_kl" in m]
    assert evals and evals[-1]["step"] == 6 and evals[-1]["eval_tokens"] == 6 * (SEQ_LEN - 1)
    assert (run / "final" / "config.json").exists()
    lineage = json.loads((run / "final" / "lineage.json").read_text())
    assert lineage["cache"] == url


KILL_SEQUENCES = 240  # 40 shards: time between commits to kill in the middle


def test_kill_9_mid_upload_then_rerun_gives_identical_bytes(tmp_path, bucket, teacher_dir, corpus_jsonl):
    reference = tmp_path / "reference"
    cache_teacher(_config(teacher_dir, corpus_jsonl, reference, max_sequences=KILL_SEQUENCES))
    url = f"s3://{bucket}/cache"
    cmd = [sys.executable, "-m", "kd_pipeline", *_cli_args(teacher_dir, corpus_jsonl, url, KILL_SEQUENCES)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    c = _client()

    def committed() -> int:
        try:
            body = c.get_object(Bucket=bucket, Key="cache/manifest.json")["Body"].read()
        except c.exceptions.NoSuchKey:
            return 0
        return len(json.loads(body)["shards"])

    deadline = time.time() + 600  # a loaded machine takes minutes to import torch and reach the first shard
    while committed() < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = committed()
    assert 3 <= done < KILL_SEQUENCES // 6
    assert not load_cache(url, require_complete=False).complete
    # The killed writer's lease is still there: a rerun on this host sees its pid is gone and takes over at once.
    assert [k for k in _objects(bucket, "cache") if k.startswith(".writer000.lock/")]
    # What an upload in flight leaves (a multipart upload no reader sees) is aborted by the rerun.
    c.create_multipart_upload(Bucket=bucket, Key=f"cache/shards/{done:08d}.parquet")
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "aborted" in rerun.stderr
    assert _cache_objects(bucket, "cache") == _local_cache_bytes(reference)
    assert c.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert not [k for k in _objects(bucket, "cache") if "writer" in k]


def test_killed_multipart_upload_is_invisible_and_cleaned(bucket):
    """A shard bigger than one upload part, its writer killed after the first part: no object, one multipart
    upload, which the next writer's clean-up aborts."""
    url = f"s3://{bucket}/big"
    child = f"""
import numpy as np, pyarrow as pa, time
from kd_pipeline.cache.format.storage import open_store
store = open_store({url!r}, {{"default_block_size": 5 << 20}})
table = pa.table({{"x": np.random.default_rng(0).integers(0, 1 << 62, 4 << 20)}})  # 32 MiB, incompressible
store.write_parquet("shards/00000000.parquet", table, compression="none", row_group_size=1 << 16)
"""
    proc = subprocess.Popen([sys.executable, "-c", child], stderr=subprocess.PIPE)
    c = _client()
    deadline = time.time() + 300
    uploads = []
    while time.time() < deadline and proc.poll() is None:
        uploads = c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        if uploads and c.list_parts(Bucket=bucket, Key=uploads[0]["Key"], UploadId=uploads[0]["UploadId"]).get("Parts"):
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [u["Key"] for u in uploads] == ["big/shards/00000000.parquet"]
    assert _objects(bucket, "big") == {}  # nothing visible
    removed = open_store(url).clean_interrupted()
    assert len(removed) == 1 and "big/shards/00000000.parquet" in removed[0]
    assert c.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_failed_shard_write_leaves_no_object(bucket, monkeypatch):
    """A write that fails after 12 MiB went out (two 5 MiB parts uploaded): no object, no upload left."""
    import numpy as np
    import pyarrow.parquet as pq

    store = open_store(f"s3://{bucket}/c", {"default_block_size": 5 << 20})

    def write_then_fail(table, sink, **kwargs):
        sink.write(np.random.default_rng(0).bytes(12 << 20))
        raise RuntimeError("the teacher died mid-shard")

    monkeypatch.setattr(pq, "write_table", write_then_fail)
    with pytest.raises(RuntimeError, match="mid-shard"):
        store.write_parquet("shards/00000000.parquet", pa.table({"x": [1]}))
    assert _objects(bucket, "c") == {}
    assert _client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_second_writer_refused_naming_the_holder(bucket, teacher_dir, corpus_jsonl):
    url = f"s3://{bucket}/cache"
    store = open_store(url)
    with hold_lease(store, ".writer000.lock", "a test writer"):
        with pytest.raises(
            LockHeld, match=r"being written by another run \(pid \d+ on host .+, since .+renewed \d+ s ago"
        ):
            cache_teacher(_config(teacher_dir, corpus_jsonl, url))
        result = CliRunner().invoke(app, _cli_args(teacher_dir, corpus_jsonl, url, 30))
        assert result.exit_code == 2
        assert "being written by another run" in result.output and "Traceback" not in result.output
    assert _objects(bucket, "cache") == {}  # the refused writers wrote nothing
    cache_teacher(_config(teacher_dir, corpus_jsonl, url))  # released: free again
    assert load_cache(url).complete


def test_lease_taken_over_only_after_expiry_and_loser_stops(bucket):
    store = open_store(f"s3://{bucket}/c")
    foreign = json.dumps({"pid": 1, "host": "another-node", "since": "earlier"}).encode()
    store.fs.pipe_file(store.path(".writer000.lock/00000000"), foreign)
    with pytest.raises(LockHeld, match="pid 1 on host another-node"):
        with hold_lease(store, ".writer000.lock", "worker 0", ttl=60):
            pass
    time.sleep(2.5)  # the foreign lease was not renewed for longer than this writer's ttl
    with hold_lease(store, ".writer000.lock", "worker 0", ttl=2) as lease:
        assert lease.number == 1
        # A third writer takes the lease over behind this one's back (as if this one could not renew for ttl):
        store.fs.pipe_file(store.path(".writer000.lock/00000002"), foreign)
        deadline = time.time() + 10
        while lease.lost is None and time.time() < deadline:
            time.sleep(0.1)
        with pytest.raises(LockHeld, match="took over the lease"):
            lease.check()


def test_store_without_conditional_write_refuses_unless_no_lock(tmp_path, teacher_dir, corpus_jsonl):
    url = f"memory://kd-{uuid.uuid4().hex[:8]}/cache"  # fsspec's in-process filesystem: no atomic create
    with pytest.raises(CacheError, match="offers no conditional write.*--no-lock"):
        cache_teacher(_config(teacher_dir, corpus_jsonl, url))
    cache_teacher(_config(teacher_dir, corpus_jsonl, url, no_lock=True))
    local = tmp_path / "local"
    cache_teacher(_config(teacher_dir, corpus_jsonl, local))
    assert (read_all(url).topk_logprobs == read_all(local).topk_logprobs).all()


@pytest.fixture
def damaged(bucket, teacher_dir, corpus_jsonl):
    url = f"s3://{bucket}/cache"
    cache_teacher(_config(teacher_dir, corpus_jsonl, url))
    return bucket, url


def test_damaged_truncated_and_missing_shards_are_named(damaged):
    bucket, url = damaged
    c = _client()

    def get(n):
        return c.get_object(Bucket=bucket, Key=f"cache/shards/{n:08d}.parquet")["Body"].read()

    flipped = bytearray(get(1))
    flipped[len(flipped) // 2] ^= 0xFF
    c.put_object(Bucket=bucket, Key="cache/shards/00000001.parquet", Body=bytes(flipped))
    short = get(2)
    c.put_object(Bucket=bucket, Key="cache/shards/00000002.parquet", Body=short[: len(short) // 2])
    c.delete_object(Bucket=bucket, Key="cache/shards/00000003.parquet")
    report = verify_cache(url)
    assert report.problems == [
        f"{url}/shards/00000001.parquet: sha256 mismatch (file corrupted or replaced)",
        f"{url}/shards/00000002.parquet: {len(short) // 2} bytes, manifest says {len(short)}",
        f"{url}/shards/00000003.parquet: missing",
    ]
    result = CliRunner().invoke(app, ["verify", url])
    assert result.exit_code == 1 and "BAD: s3://" in result.output
    with pytest.raises(CacheError, match=r"shards/00000001\.parquet: sha256 mismatch"):
        read_all(url)
    from kd_pipeline.train.reader import CacheReader

    reader = CacheReader(url, 4, shuffle=False)
    with pytest.raises(CacheError, match=r"00000001\.parquet: sha256 mismatch"):
        list(reader.iter_epoch(0))


def test_missing_bucket_is_one_line_exit_2(s3_env, teacher_dir, corpus_jsonl, student_config, tmp_path):
    runner = CliRunner()
    url = "s3://no-such-bucket-kd/cache"
    for args in (
        ["inspect", url],
        _cli_args(teacher_dir, corpus_jsonl, url, 12),
        ["distill", "--student", str(student_config), "--cache", url, "--out", str(tmp_path / "r"), "--device", "cpu"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args[0], result.output)
        line = result.output.strip()
        assert len(line.splitlines()) == 1 and "no-such-bucket-kd" in line, line
        assert "bucket does not exist" in line or "NoSuchBucket" in line, line


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def auth_server():
    """A moto server with signature checks on, in its own process: moto's reset-auth turns them on for every
    server of a process (they share one backend), and so for the other tests too. The key pair is made through
    moto's IAM API while checks are still off."""
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("the moto server process did not start")
                time.sleep(0.1)
        admin = dict(endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="y", region_name="us-east-1")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="kd")
        iam.put_user_policy(
            UserName="kd",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            ),
        )
        key = iam.create_access_key(UserName="kd")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket="guarded")
        request = urllib.request.Request(
            endpoint + "/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        urllib.request.urlopen(request).read()
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_wrong_credentials_are_one_line_exit_2_without_the_secret(
    auth_server, monkeypatch, teacher_dir, corpus_jsonl, student_config, tmp_path
):
    endpoint, key_id, real_secret = auth_server
    wrong = "WRONGsecretWRONGsecretWRONGsecret0123456"
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    runner = CliRunner()
    url = "s3://guarded/cache"
    secret_option = ["--storage-option", f"key={key_id}", "--storage-option", f"secret={wrong}"]
    for args in (
        ["inspect", url],
        ["inspect", url, *secret_option],
        _cli_args(teacher_dir, corpus_jsonl, url, 12),
        [*_cli_args(teacher_dir, corpus_jsonl, url, 12), *secret_option],
        ["distill", "--student", str(student_config), "--cache", url, "--out", str(tmp_path / "r"), "--device", "cpu"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args[0], result.output)
        line = result.output.strip()
        assert len(line.splitlines()) == 1, line
        assert "Forbidden" in line or "SignatureDoesNotMatch" in line or "AccessDenied" in line, line
        assert "credentials" in line
        assert wrong not in result.output and real_secret not in result.output
    verify = runner.invoke(app, ["verify", url])
    assert verify.exit_code == 1 and wrong not in verify.output
    # the right key pair, given as storage options, works against the same server and is written nowhere
    options = ["--storage-option", f"key={key_id}", "--storage-option", f"secret={real_secret}"]
    result = runner.invoke(app, [*_cli_args(teacher_dir, corpus_jsonl, url, 12), *options])
    assert result.exit_code == 0, result.output
    assert real_secret not in result.output
    import boto3

    c = boto3.client("s3", aws_access_key_id=key_id, aws_secret_access_key=real_secret)
    keys = [o["Key"] for o in c.list_objects_v2(Bucket="guarded")["Contents"]]
    assert "cache/manifest.json" in keys and "cache/config.yaml" in keys
    for key in keys:
        assert real_secret.encode() not in c.get_object(Bucket="guarded", Key=key)["Body"].read(), key


def test_a_chained_url_keeps_a_local_copy_for_nodes_that_reread(
    tmp_path, monkeypatch, bucket, teacher_dir, corpus_jsonl
):
    import s3fs

    from kd_pipeline.train.reader import CacheReader

    url = f"s3://{bucket}/cache"
    cache_teacher(_config(teacher_dir, corpus_jsonl, url))
    local = tmp_path / "node-cache"
    options = parse_storage_options([f"simplecache.cache_storage={local}"])
    calls: list[str] = []  # the S3 operations s3fs sends (a spy: every call goes on to the server)
    send = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        calls.append(method)
        return await send(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)

    def epoch() -> list[int]:
        calls.clear()
        reader = CacheReader(load_cache(f"simplecache::{url}", storage_options=options), 4, shuffle=False)
        return [int(i) for b in reader.iter_epoch(0) for i in b["seq_ids"]]

    assert epoch() == list(range(30))
    assert calls.count("get_object") >= 5  # the manifest, and each of the 5 shards once
    copies = sorted(p.stat().st_size for p in local.iterdir())
    shards = sorted(len(v) for k, v in _cache_objects(bucket, "cache").items() if k.startswith("shards/"))
    assert [s for s in shards if s in copies] == shards  # every shard downloaded to the node
    assert epoch() == list(range(30))
    # A rereading node fetches nothing again (the manifest is a local copy too): HEADs only, by which the reader
    # proves each shard is the one it verified.
    assert calls.count("get_object") == 0 and "head_object" in calls, calls


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_dataset_view_in_dataloader_workers(bucket, teacher_dir, corpus_jsonl, start):
    """CacheDataset on a URL in DataLoader workers: a forked worker makes its own client (fsspec's async clients
    refuse to run after a fork), a spawned one unpickles the store."""
    import torch

    from kd_pipeline.train.dataset import CacheDataset

    url = f"s3://{bucket}/cache"
    cache_teacher(_config(teacher_dir, corpus_jsonl, url))
    dataset = CacheDataset(url, shuffle=False)
    assert "manifest.json" in dataset.reader.info.store.list("")  # the parent's client runs before the fork
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, num_workers=1, multiprocessing_context=start)
    assert sorted(int(i) for b in loader for i in b["seq_ids"]) == list(range(30))
