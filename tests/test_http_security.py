"""Security of the encoder service and of model loading: body limits, zip bombs, no unpickling, the bind address.

The fuzz tests feed `read_http_batch` (the whole wire format) with hypothesis-made bodies and start no Ray;
the route tests send real HTTP to a real Serve app on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envenc_ray.errors import EnvEncError, InputError
from envenc_ray.serve.http import BodyTooLargeError, read_http_batch

LIMIT = 1 << 20  # max_body_bytes of the fuzz cases
FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)  # object arrays too: what an attacker could send
    return buffer.getvalue()


def npz(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def outcome(body: bytes) -> str:
    """'ok' for a valid batch, 'refused' for an InputError; anything else propagates and fails the test."""
    try:
        frames, windows, _ = read_http_batch(body, LIMIT)
    except InputError as error:
        message = str(error)
        assert message and "pickle" not in message, message  # numpy's "pickled (object) data" never leaks out
        return "refused"
    assert isinstance(frames, np.ndarray) and frames.flags.writeable
    assert windows is None or isinstance(windows, list)
    return "ok"


DTYPES = st.sampled_from(["u1", "i1", "<i2", ">i4", "<i8", "<f2", "<f4", ">f8", "<c8", "?", "O", "<U3", "V4"])
SHAPES = st.lists(st.integers(0, 6), min_size=0, max_size=5).map(tuple)


@st.composite
def arrays(draw):
    dtype, shape = np.dtype(draw(DTYPES)), draw(SHAPES)
    if dtype.hasobject:
        return np.array([draw(st.integers())] * int(np.prod(shape)), dtype=object).reshape(shape)
    return np.zeros(shape, dtype=dtype)


def fuzz(check, **strategies) -> int:
    """Run `check` on hypothesis examples of `strategies`; returns how many examples were tried."""
    tried = []

    @FUZZ
    @given(**strategies)
    def run(**example):
        tried.append(1)
        check(**example)

    run()
    return len(tried)


def test_fuzz_random_bodies_are_refused_cleanly():
    def check(body):
        assert outcome(body) in ("ok", "refused")
        assert outcome(b"\x93NUMPY" + body) in ("ok", "refused")  # past the magic: the header parser's turn
        assert outcome(b"PK\x03\x04" + body) == "refused"  # a zip that is not one

    assert fuzz(check, body=st.binary(max_size=512)) >= 150


def test_fuzz_any_array_round_trips_or_is_refused_and_objects_never_load():
    def check(array):
        result = outcome(npy(array))
        assert result == ("refused" if array.dtype.hasobject else "ok")
        if result == "ok":
            frames, _, _ = read_http_batch(npy(array), LIMIT)
            assert frames.dtype == array.dtype and frames.shape == array.shape

    assert fuzz(check, array=arrays()) >= 100


def test_fuzz_truncated_or_padded_bodies_are_refused():
    def check(frames, cut, extra):
        body = npy(np.zeros((frames, 5, 4, 3), np.uint8))
        assert outcome(body[: int(len(body) * cut)]) == "refused"
        if extra:
            assert outcome(body + extra) == "refused"
        archive = npz({"frames.npy": body})
        assert outcome(archive[: int(len(archive) * cut)]) == "refused"

    assert fuzz(check, frames=st.integers(1, 4), cut=st.floats(0, 1, exclude_max=True),
                extra=st.binary(max_size=8)) >= 150


def test_fuzz_lying_headers_allocate_nothing():
    """A header may claim any shape: the data must match it exactly before memory is set aside."""
    def check(shape, descr, fortran):
        header = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}".encode("latin1")
        body = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x00" * 64
        result = outcome(body)
        if int(np.prod(shape, dtype=object)) > 64 or descr in ("'|O'", "'nonsense'", "42", "None"):
            assert result == "refused"

    assert fuzz(check, shape=st.lists(st.integers(0, 10**12), min_size=1, max_size=4).map(tuple),
                descr=st.sampled_from(["'|u1'", "'<f4'", "'|O'", "'nonsense'", "42", "None"]),
                fortran=st.sampled_from(["False", "True", "'x'"])) >= 150


def test_fuzz_npz_members_and_bombs():
    def check(members, stored, size):
        arrays_by_name = {"frames": np.zeros((size, 4, 4, 3), np.uint8),
                          "windows": np.zeros((size, 2, 3), np.float32), "fresh": np.ones(size, bool)}
        body = npz({name: npy(arrays_by_name.get(name.removesuffix(".npy"), np.zeros(3))) for name in members},
                   zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
        names = [name.removesuffix(".npy") for name in members]
        valid = "frames" in names and set(names) <= {"frames", "windows", "fresh"} and len(set(names)) == len(names)
        expected = "ok" if valid else "refused"
        assert outcome(body) == expected

    assert fuzz(check, members=st.lists(st.sampled_from(["frames.npy", "windows.npy", "fresh.npy", "evil.npy",
                                                         "frames"]), max_size=3, unique=True),
                stored=st.booleans(), size=st.integers(1, 3)) >= 100


def test_a_zip_bomb_is_refused_before_it_inflates():
    """The issue's 64 frames of 1000x1000x3 (192 MB) compress to ~190 kB: refused by their declared size."""
    bomb = npz({"frames.npy": npy(np.zeros((64, 1000, 1000, 3), np.uint8))})
    assert len(bomb) < 1 << 20
    with pytest.raises(BodyTooLargeError, match="decompress to 192000128 bytes.*serve.max_body_bytes"):
        read_http_batch(bomb, 64 * 2**20)


def test_model_weights_load_from_safetensors_only(tiny_vlm_dir, tmp_path):
    """A VLM directory with only pytorch_model.bin (a pickle) is refused before anything is unpickled."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from envenc_ray.errors import ModelError
    from envenc_ray.vlm.backbone import TruncatedVLM

    pickled = tmp_path / "vlm"
    shutil.copytree(tiny_vlm_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"only as \.bin \(a pickle.*safetensors only"):
        TruncatedVLM.from_pretrained(pickled, layer=2)


def test_remote_code_never_runs_unless_the_config_allows_it(tiny_vlm_dir, tmp_path):
    """A model folder that ships its own Python (auto_map) loads as the built-in class, its code unrun."""
    import shutil

    from envenc_ray.config import VLMConfig
    from envenc_ray.vlm.backbone import TruncatedVLM

    assert VLMConfig().trust_remote_code is False
    model = tmp_path / "vlm"
    shutil.copytree(tiny_vlm_dir, model)
    marker = tmp_path / "remote-code-ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                   "from transformers import LlavaConfig as EvilConfig\n"
                                   "from transformers import LlavaForConditionalGeneration as EvilModel\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    try:
        TruncatedVLM.from_config(VLMConfig(model=str(model), layer=2), model_path=model)
    except EnvEncError:
        pass  # refusing is fine too; running the file is not
    assert not marker.exists(), "the model folder's own code ran with trust_remote_code off"


# ------------------------------------------------------------------------------------------ the real route


@pytest.fixture(scope="module")
def guarded_app(ray_session, tmp_path_factory, tiny_vlm_dir):
    """The app with default bind address and frame limits, a 4 MiB body limit, HTTP on a free port."""
    from ray import serve
    from test_serve import TEMPORAL, make_config, save_untrained_encoder

    from envenc_ray.serve.deployment import run_app

    serve.shutdown()  # a fresh proxy with this module's http options
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = make_config(tmp_path_factory.mktemp("guarded"), tiny_vlm_dir, TEMPORAL, "guarded", port=port)
    serve_section = base.serve.model_dump() | {"max_body_bytes": 4 * 2**20}
    del serve_section["http_host"]  # the default bind address is what is under test
    config = base.model_validate(base.model_dump() | {"serve": serve_section})
    save_untrained_encoder(TEMPORAL, config.run_dir / "encoder")
    run_app(config, http=True)
    yield config
    serve.shutdown()


def request(port: int, body_parts: list[bytes], headers: dict[str, str]) -> tuple[int, dict | bytes]:
    """POST /encode; returns the status and the JSON error (4xx/5xx) or the raw answer (200)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.putrequest("POST", "/encode")
        for key, value in headers.items():
            connection.putheader(key, value)
        connection.endheaders()
        try:
            for part in body_parts:
                connection.send(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed early: exactly what a refused body should get
        response = connection.getresponse()
        body = response.read()
        if response.status == 200:
            return response.status, body
        try:
            return response.status, json.loads(body)  # our route's errors
        except ValueError:
            return response.status, {"error": body.decode(errors="replace")}  # Serve's proxy's own (503)
    finally:
        connection.close()


@pytest.mark.slow
def test_the_route_refuses_big_bodies_before_reading_them(guarded_app):
    port = guarded_app.serve.http_port
    # Content-Length over the limit: 413 after 64 kB of a claimed 192 MB
    status, answer = request(port, [b"\x00" * 65536], {"Content-Length": str(192 * 10**6)})
    assert status == 413 and "serve.max_body_bytes=4194304" in answer["error"]
    # no Content-Length (chunked): cut off once past the limit
    chunk = b"\x00" * 2**20
    parts = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * 5 + [b"0\r\n\r\n"]
    status, answer = request(port, parts, {"Transfer-Encoding": "chunked"})
    assert status == 413 and "while being read" in answer["error"]


@pytest.mark.slow
def test_the_route_bounds_pixels_and_refuses_garbage_and_objects(guarded_app):
    port = guarded_app.serve.http_port
    big_frame = npy(np.zeros((1, 1001, 1000, 3), np.uint8))  # 3 MB: under the body limit, over the pixel bound
    status, answer = request(port, [big_frame], {"Content-Length": str(len(big_frame))})
    assert status == 400 and "serve.max_frame_pixels=1000000" in answer["error"]
    for body in [b"", b"not an array", npy(np.array([1, "x"], dtype=object)), npy(np.zeros((2, 8, 8, 3), np.uint8))[:-5]]:
        status, answer = request(port, [body], {"Content-Length": str(len(body))})
        assert status == 400 and "InputError" in answer["error"] and "pickle" not in answer["error"], answer
    good = npy(np.zeros((2, 210, 160, 3), np.uint8))
    status, answer = request(port, [good], {"Content-Length": str(len(good))})
    assert status == 200 and np.load(io.BytesIO(answer)).shape == (2, 8)  # the app still answers


@pytest.mark.slow
def test_the_proxy_binds_loopback_by_default(guarded_app):
    import ray
    from ray.serve.context import _get_global_client

    assert guarded_app.serve.http_host == "127.0.0.1"
    assert _get_global_client().get_serve_details()["http_options"]["host"] == "127.0.0.1"
    node_ip = ray.util.get_node_ip_address()
    if node_ip.startswith("127."):
        pytest.fail(f"this machine's node address {node_ip} is loopback: the check below could not fail")
    with pytest.raises(OSError):  # nothing listens on the machine's own address
        socket.create_connection((node_ip, guarded_app.serve.http_port), timeout=5).close()


@pytest.mark.slow
def test_an_overloaded_route_answers_503_at_once(guarded_app):
    """The same app with a queue of 2 (4 calls running per replica): a burst of 48 concurrent POSTs gets 200s
    and back-pressure 503s from Serve's proxy, nothing else; the app answers again afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    from envenc_ray.serve.deployment import run_app

    serve_section = guarded_app.serve.model_dump() | {"max_queued_requests": 2, "max_ongoing_requests": 4}
    config = guarded_app.model_validate(guarded_app.model_dump() | {"serve": serve_section})
    run_app(config, http=True)
    try:
        body = npy(np.zeros((8, 210, 160, 3), np.uint8))

        def post(_) -> int:
            return request(config.serve.http_port, [body], {"Content-Length": str(len(body))})[0]

        with ThreadPoolExecutor(max_workers=48) as pool:
            statuses = list(pool.map(post, range(48)))
        counts = {status: statuses.count(status) for status in set(statuses)}
        print(f"http burst of 48: {counts}")
        assert set(counts) == {200, 503}, counts
        assert post(0) == 200
    finally:
        run_app(guarded_app, http=True)  # the module's app as it was
