import pytest

from pneumonet.config import dump_config, load_config
from pneumonet.errors import ConfigError


def test_overrides_change_exactly_their_keys_with_their_types():
    config = load_config(None, ["train.epochs=3", "model.backbone=ResNet50V2", "train.learning_rate=1e-4",
                                "model.custom_filters=[8, 16]", "train.cache_features=false"])  # fmt: skip
    expected = load_config().model_dump()
    expected["train"].update(epochs=3, learning_rate=1e-4, cache_features=False)
    expected["model"].update(backbone="ResNet50V2", custom_filters=[8, 16])
    assert config.model_dump() == expected  # every other key keeps its default
    assert type(config.train.learning_rate) is float and config.train.cache_features is False  # YAML reads 1e-4 as text


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ntrain:\n  epochs: 9\n  batch_size: 8\n")
    config = load_config(path, ["train.epochs=2"])
    assert (config.seed, config.train.epochs, config.train.batch_size) == (3, 2, 8)


def test_round_trip_through_yaml(tmp_path):
    config = load_config(None, ["distributed.workers=2"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.epochz=3", "unknown key 'train.epochz'"),
        ("train.epochs=zero", "'train.epochs'"),
        ("train.epochs=0", "'train.epochs'"),
        ("model.backbone=NoSuchNet", "'model.backbone'"),
        ("data.val_fraction=0.9", "'data.val_fraction'"),
        ("tracking.mode=sometimes", "'tracking.mode'"),
        ("data.max_image_bytes=0", "'data.max_image_bytes'"),
        ("data.max_decode_seconds=0", "'data.max_decode_seconds'"),
        ("serve.request_timeout_s=-1", "'serve.request_timeout_s'"),
        ("nonsense", "key.path=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_image_limits_default_and_override():
    assert load_config().data.max_image_bytes == 64 * 2**20
    assert load_config(None, ["data.max_image_bytes=1000000"]).data.max_image_bytes == 1_000_000
    assert load_config().data.max_decode_seconds == 30.0 and load_config().serve.request_timeout_s == 30.0
    assert load_config(None, ["data.max_decode_seconds=null"]).data.max_decode_seconds is None  # in-process, no limit


def test_workers_use_every_core_of_this_machine_by_default(monkeypatch):
    from pneumonet.training import resources

    monkeypatch.setattr(resources, "machine_cpus", lambda: 8)
    assert load_config().distributed.cpus_per_worker == "auto"
    assert resources.worker_cpus(load_config(), local=True) == 8.0
    assert resources.worker_cpus(load_config(None, ["distributed.workers=3"]), local=True) == 2.6666
    assert resources.worker_cpus(load_config(None, ["distributed.cpus_per_worker=1.5"]), local=True) == 1.5
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        load_config(None, ["distributed.cpus_per_worker=0"])


def test_on_a_cluster_auto_follows_the_nodes_cpus():
    from pneumonet.training.resources import auto_worker_cpus

    assert auto_worker_cpus([0.0, 4.0, 4.0], 2) == 4.0  # a head without CPUs, two 4-CPU worker pods
    assert auto_worker_cpus([4.0], 2) == 2.0  # two workers share one pod
    assert auto_worker_cpus([4.0, 4.0], 3) == 2.0  # whole CPUs, so three fit on two pods
    assert auto_worker_cpus([1.0], 4) == 0.25
    assert auto_worker_cpus([0.0], 1) == 0.0  # nothing to follow yet (autoscaling from zero)
