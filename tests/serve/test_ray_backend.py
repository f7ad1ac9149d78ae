"""`plait serve --backend ray`: the engine as a Ray Serve deployment on a local Ray instance (2 CPUs),
answering the OpenAI client on 127.0.0.1 with the tokens the in-process engine gives."""

from __future__ import annotations

import httpx
import pytest

from plait.errors import ConfigError
from plait.serve import Engine, EngineConfig, SamplingParams
from plait.serve.ray_backend import autoscaling_config, start_ray
from tests.helpers import free_port
from tests.serve.support import API_KEY, write_run


def engine_config() -> EngineConfig:
    return EngineConfig(max_seqs=4, prefill_chunk=16)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("ray") / "run")[0]


@pytest.fixture(scope="module")
def ray_server(run_dir):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        server = start_ray(run_dir, host="127.0.0.1", port=free_port(), api_key=API_KEY, config=engine_config(),
                           autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
                                        "upscale_delay_s": 1.0, "downscale_delay_s": 5.0},
                           model_name="tiny", replica_cpus=1)
        yield server
        server.shutdown()
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")  # Ray's own
def test_completion_through_ray_serve_matches_the_engine(ray_server, run_dir):
    from openai import OpenAI
    from ray import serve

    want = Engine.from_path(run_dir, engine_config()).generate(
        ["The list "], SamplingParams(max_tokens=8, temperature=0))[0].text
    client = OpenAI(base_url=ray_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    got = client.completions.create(model="tiny", prompt="The list ", max_tokens=8, temperature=0)
    assert got.choices[0].text == want and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 8
    streamed = client.completions.create(model="tiny", prompt="The list ", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want
    # The same API, refusals included: no key, 401 from the replica's app.
    assert httpx.get(ray_server.url + "/v1/models", timeout=30).status_code == 401
    # Ray Serve runs it with the autoscaling settings it was given.
    deployment = serve.status().applications["plait"].deployments["plait"]
    assert str(deployment.status).endswith("HEALTHY")


def test_autoscaling_settings_are_checked_before_ray_starts():
    assert autoscaling_config(None) is None
    assert autoscaling_config({"max_replicas": 3}) == {
        "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2.0, "upscale_delay_s": 30.0,
        "downscale_delay_s": 600.0}
    with pytest.raises(ConfigError, match="'max_replica' are unknown; valid: min_replicas"):
        autoscaling_config({"max_replica": 3})
    with pytest.raises(ConfigError, match="min_replicas=3 exceeds max_replicas=2"):
        start_ray("unused", autoscaling={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ConfigError, match="--port 0 must be in"):
        start_ray("unused", port=0)
