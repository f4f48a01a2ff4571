"""The params loader: frozen dataclasses, unknown keys and wrong types rejected with the key named."""

from dataclasses import dataclass, field

import pytest

from loca_pipe.pipeline.errors import ConfigError
from loca_pipe.stages.config import build, load_section


@dataclass(frozen=True)
class _Section:
    alpha: tuple[float, ...] = (0.9,)
    tau: float = 4.0
    k: int = 5
    name: str = "kd"
    device: str | None = None
    extra: dict = field(default_factory=dict)


def test_defaults_and_overrides():
    cfg = load_section(_Section, "s", {"s": {"tau": 2, "alpha": 0.5}}, overrides={"k": 3, "name": None})
    assert cfg == _Section(alpha=(0.5,), tau=2.0, k=3, name="kd")
    with pytest.raises(Exception):
        cfg.tau = 1.0  # frozen


@pytest.mark.parametrize("values, message", [
    ({"taux": 1.0}, "unknown key(s) ['taux']"),
    ({"tau": "hot"}, "s.tau: expected a number"),
    ({"k": 2.5}, "s.k: expected an integer"),
    ({"k": True}, "s.k: expected an integer"),
    ({"alpha": {"a": 1}}, "s.alpha: expected a list"),
    ({"alpha": [0.5, "x"]}, "s.alpha[1]: expected a number"),
    ({"name": 3}, "s.name: expected a string"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError) as exc:
        build(_Section, values, "s")
    assert message in str(exc.value)


def test_references_resolve_to_the_named_key(tmp_path):
    from loca_pipe.stages.config import read_params

    path = tmp_path / "params.yaml"
    path.write_text("analyze:\n  alpha: [0.9, 0.95]\n  tau: 4\n"
                    "calibrate:\n  alpha: =analyze.alpha\n  tau: '= analyze.tau'\n  note: 'a =analyze.tau'\n"
                    "  dvc: ${analyze.tau}\n"
                    "train_student:\n  alphas: =calibrate.alpha\n")
    p = read_params(path)
    assert p["calibrate"]["alpha"] == [0.9, 0.95]
    assert p["calibrate"]["tau"] == 4
    assert p["calibrate"]["note"] == "a =analyze.tau"  # only whole values are references
    assert p["calibrate"]["dvc"] == "${analyze.tau}"  # DVC's syntax is left alone
    assert p["train_student"]["alphas"] == [0.9, 0.95]  # chains resolve


@pytest.mark.parametrize("text, message", [
    ("analyze:\n  x: =base.y\n", r"reference =base.y names no key"),
    ("analyze:\n  x: =analyze.y\n  y: =analyze.x\n", "reference cycle"),
])
def test_bad_references(tmp_path, text, message):
    from loca_pipe.stages.config import read_params

    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_params(path)


@pytest.mark.parametrize("text, kind, expected", [
    (None, float, None), ("0.9, 0.95", float, [0.9, 0.95]), ("0,1,2", int, [0, 1, 2]), ("a,,b", str, ["a", "b"]),
])
def test_comma_list(text, kind, expected):
    from loca_pipe.cli.options import comma_list

    assert comma_list(text, "--x", kind) == expected


def test_comma_list_names_the_option():
    from loca_pipe.cli.options import comma_list

    with pytest.raises(ConfigError, match=r"--alphas takes comma-separated values such as '0.9,0.95'; got '0.9,x'"):
        comma_list("0.9,x", "--alphas", float)


@dataclass(frozen=True)
class _Shared:
    workdir: str = "w"
    seed: int = 0


@dataclass(frozen=True)
class _WithBase:
    tau: float = 1.0
    base: _Shared = _Shared()


def test_one_loader_for_both_pipelines_shared_section_and_optional_default(tmp_path, monkeypatch):
    """The LM stages' loader is load_section with a shared section (lm_base → field base) and an optional default
    params.yaml; its errors are load_section's."""
    from loca_pipe.stages.lm import common
    from loca_pipe.stages.lm.train_student import Params, SECTION

    data = {"s": {"tau": 2}, "shared": {"seed": 3}}
    p = load_section(_WithBase, "s", data, {"tau": None}, shared=(_Shared, "shared"), shared_overrides={"workdir": "x"})
    assert p == _WithBase(tau=2.0, base=_Shared(workdir="x", seed=3))
    with pytest.raises(ConfigError, match="s: unknown key 'base'; the shared settings go in the shared section"):
        load_section(_WithBase, "s", {"s": {"base": {}}}, shared=(_Shared, "shared"))
    with pytest.raises(ConfigError, match=r"shared: unknown key\(s\) \['sed'\]"):
        load_section(_WithBase, "s", {"shared": {"sed": 1}}, shared=(_Shared, "shared"))
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    assert load_section(_WithBase, "s", "params.yaml", shared=(_Shared, "shared"), default_optional=True) == _WithBase()
    assert common.load(Params, SECTION) == load_section(Params, SECTION, {}, shared=(common.LMBase, "lm_base"))
    with pytest.raises(ConfigError, match="params file 'params.yaml' not found"):
        load_section(_WithBase, "s", "params.yaml")  # the image CLI's behaviour is unchanged
    with pytest.raises(ConfigError, match="params file 'other.yaml' not found"):
        common.load(Params, SECTION, "other.yaml")
