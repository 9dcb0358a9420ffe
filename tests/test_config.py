"""Config schema, loader and error messages (cf. torchtitan's test_job_config)."""

from pathlib import Path

import pytest
import yaml
from adadecode.launcher.config import (
    ConfigError,
    DecodingConfig,
    ModelConfig,
    PipelineConfig,
    RunConfig,
    TransportConfig,
    check_world_size,
    config_help,
    config_to_dict,
    dump_yaml,
    field_docs,
    load_config,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_YAML = str(CONFIGS / "smollm2-135m.yaml")


def write_yaml(tmp_path: Path, text: str, name: str = "x.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------- defaults and files


def test_default_yaml_equals_dataclass_defaults():
    assert load_config(["--config", DEFAULT_YAML]) == RunConfig()
    # Every key is spelled out, so the file documents the whole schema.
    data = yaml.safe_load(Path(DEFAULT_YAML).read_text())
    assert data == config_to_dict(RunConfig())


def test_three_stage_yaml():
    cfg = load_config(["--config", str(CONFIGS / "smollm2-135m-3stage.yaml")])
    expected = RunConfig(pipeline=PipelineConfig(stages=3))
    assert cfg == expected
    assert cfg.pipeline.split_points == []


def test_no_arguments_gives_defaults():
    assert load_config() == RunConfig()
    assert load_config([]) == RunConfig()


def test_defaults_file_is_used_only_without_config(tmp_path):
    base = write_yaml(tmp_path, "pipeline: {stages: 2}\n", "base.yaml")
    other = write_yaml(tmp_path, "decoding: {max_new_tokens: 7}\n", "other.yaml")
    assert load_config([], defaults_file=base).pipeline.stages == 2
    cfg = load_config(["--config", other], defaults_file=base)
    assert cfg.pipeline.stages == 1
    assert cfg.decoding.max_new_tokens == 7


def test_empty_yaml_and_empty_section_set_nothing(tmp_path):
    assert load_config(["--config", write_yaml(tmp_path, "")]) == RunConfig()
    assert load_config(["--config", write_yaml(tmp_path, "model:\n", "y.yaml")]) == RunConfig()


# -------------------------------------------------------------------- precedence


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    path = write_yaml(tmp_path, "pipeline:\n  stages: 2\n  threads: 4\ndecoding:\n  chat: true\n")
    cfg = load_config(["--config", path, "--pipeline.stages=3", "--pipeline.split_points=5,9"])
    assert cfg.pipeline.stages == 3  # CLI beats YAML
    assert cfg.pipeline.threads == 4  # YAML beats default
    assert cfg.decoding.chat is True
    assert cfg.model == ModelConfig()  # untouched section keeps defaults


def test_cli_order_does_not_matter_for_config_and_last_override_wins(tmp_path):
    path = write_yaml(tmp_path, "pipeline: {stages: 2}\n")
    cfg = load_config(["--pipeline.threads", "2", "--config=" + path, "--pipeline.threads=3"])
    assert cfg.pipeline.stages == 2
    assert cfg.pipeline.threads == 3


@pytest.mark.parametrize(
    "argv",
    [
        ["--pipeline.stages=3"],
        ["--pipeline.stages", "3"],
    ],
)
def test_both_flag_forms(argv):
    assert load_config(argv).pipeline.stages == 3


# -------------------------------------------------------------------- CLI parsing


@pytest.mark.parametrize(
    "argv, key, expected",
    [
        (["--model.max_seq_len=4096"], "model.max_seq_len", 4096),
        (["--pipeline.threads=-0"], "pipeline.threads", 0),
        (["--transport.timeout_s=5"], "transport.timeout_s", 5.0),
        (["--transport.timeout_s=0.25"], "transport.timeout_s", 0.25),
        (["--model.dtype=bfloat16"], "model.dtype", "bfloat16"),
        (["--model.source=/models/llama"], "model.source", "/models/llama"),
        (["--model.source=a=b"], "model.source", "a=b"),  # only the first `=` splits
        (["--model.cache_dir="], "model.cache_dir", ""),
        (["--decoding.early_exit", "deferred"], "decoding.early_exit", "deferred"),
        (["--logging.level=DEBUG"], "logging.level", "DEBUG"),
        (["--transport.backend=gloo"], "transport.backend", "gloo"),
        (["--decoding.chat"], "decoding.chat", True),
        (["--decoding.chat", "--pipeline.stages=1"], "decoding.chat", True),
    ],
)
def test_cli_value_parsing(argv, key, expected):
    section, name = key.split(".")
    value = getattr(getattr(load_config(argv), section), name)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    "raw, expected",
    [("true", True), ("True", True), ("1", True), ("yes", True), ("false", False), ("0", False), ("NO", False)],
)
def test_cli_bool_spellings(raw, expected):
    assert load_config([f"--decoding.chat={raw}"]).decoding.chat is expected
    assert load_config(["--decoding.chat", raw]).decoding.chat is expected


@pytest.mark.parametrize(
    "argv, attr, expected",
    [
        (["--pipeline.stages=3", "--pipeline.split_points=10,20"], "split_points", [10, 20]),
        (["--pipeline.stages=3", "--pipeline.split_points=10, 20"], "split_points", [10, 20]),
        (["--pipeline.stages=3", "--pipeline.split_points=[10,20]"], "split_points", [10, 20]),
        (["--pipeline.stages=3", "--pipeline.split_points", "[10, 20]"], "split_points", [10, 20]),
        (["--pipeline.stages=2", "--pipeline.split_points=7"], "split_points", [7]),
        (["--pipeline.split_points="], "split_points", []),
        (["--pipeline.split_points=[]"], "split_points", []),
        (["--decoding.stop=###,END"], "stop", ["###", "END"]),
        (["--decoding.stop=<|im_end|>"], "stop", ["<|im_end|>"]),
        (["--decoding.stop=[\"a,b\", \"\\n\"]"], "stop", ["a,b", "\n"]),
        (["--decoding.stop= x"], "stop", [" x"]),  # string items are taken verbatim
        (["--decoding.stop="], "stop", []),
    ],
)
def test_cli_list_parsing(argv, attr, expected):
    cfg = load_config(argv)
    section = cfg.pipeline if hasattr(cfg.pipeline, attr) else cfg.decoding
    assert getattr(section, attr) == expected


# ------------------------------------------------------------- YAML value types


def test_yaml_int_is_coerced_to_float(tmp_path):
    cfg = load_config(["--config", write_yaml(tmp_path, "transport:\n  timeout_s: 30\n")])
    assert cfg.transport.timeout_s == 30.0 and type(cfg.transport.timeout_s) is float


def test_yaml_unquoted_off_means_off(tmp_path):
    # YAML 1.1 reads `off` as false; the loader maps it back for fields with an "off" choice.
    cfg = load_config(["--config", write_yaml(tmp_path, "decoding:\n  early_exit: off\n")])
    assert cfg.decoding.early_exit == "off"


def test_default_lists_are_not_shared():
    a, b = PipelineConfig(), PipelineConfig()
    a.split_points.append(3)
    assert b.split_points == []
    points = [4]
    assert PipelineConfig(stages=2, split_points=points).split_points is not points


# ------------------------------------------------------------- validation errors

# (argv, key, value as shown, words the fix must contain)
VALUE_ERRORS = [
    (["--pipeline.stages=0"], "pipeline.stages", "0", ">= 1"),
    (["--pipeline.stages=-2"], "pipeline.stages", "-2", "--pipeline.stages=2"),
    (["--pipeline.threads=-1"], "pipeline.threads", "-1", "--pipeline.threads=0"),
    (["--model.max_seq_len=1"], "model.max_seq_len", "1", ">= 2"),
    (["--model.source="], "model.source", "''", "--model.source="),
    (["--decoding.max_new_tokens=0"], "decoding.max_new_tokens", "0", "--decoding.max_new_tokens=128"),
    (["--transport.timeout_s=0"], "transport.timeout_s", "0.0", "--transport.timeout_s=60"),
    (["--transport.timeout_s=nan"], "transport.timeout_s", "nan", "> 0"),
    (["--transport.timeout_s=inf"], "transport.timeout_s", "inf", "finite"),
    (["--model.dtype=fp16"], "model.dtype", "'fp16'", "one of 'auto', 'float32', 'bfloat16', 'float16'"),
    (["--model.dtype=float61"], "model.dtype", "'float61'", "did you mean 'float16'?"),
    (["--decoding.early_exit=defered"], "decoding.early_exit", "'defered'", "did you mean 'deferred'?"),
    (["--logging.level=info"], "logging.level", "'info'", "did you mean 'INFO'?"),
    (["--transport.backend=mpi"], "transport.backend", "'mpi'", "one of 'inprocess', 'gloo', 'nccl'"),
    (["--pipeline.stages=two"], "pipeline.stages", "'two'", "--pipeline.stages=2"),
    (["--pipeline.stages=2.0"], "pipeline.stages", "'2.0'", "an int"),
    (["--transport.timeout_s=soon"], "transport.timeout_s", "'soon'", "--transport.timeout_s=1.5"),
    (["--decoding.chat=maybe"], "decoding.chat", "'maybe'", "--decoding.chat=true"),
    (["--pipeline.split_points=1,x"], "pipeline.split_points", "'1,x'", "--pipeline.split_points=10,20"),
    (["--pipeline.split_points=[1"], "pipeline.split_points", "'[1'", "--pipeline.split_points=10,20"),
    (["--pipeline.split_points=10"], "pipeline.split_points", "[10]", "--pipeline.stages=2"),
    (["--pipeline.stages=3", "--pipeline.split_points=0,5"], "pipeline.split_points", "[0, 5]", ">= 1"),
    (["--pipeline.stages=3", "--pipeline.split_points=8,8"], "pipeline.split_points", "[8, 8]",
     "strictly increasing"),
    (["--pipeline.stages=3", "--pipeline.split_points=9,4"], "pipeline.split_points", "[9, 4]", "ascending order"),
    (["--pipeline.stages=3", "--pipeline.split_points=[1, \"a\"]"], "pipeline.split_points", "[1, 'a']",
     "is not an int"),
    (["--decoding.stop=a,,b"], "decoding.stop", "['a', '', 'b']", "remove the empty string"),
    (["--decoding.max_new_tokens=2048"], "decoding.max_new_tokens", "2048", "--model.max_seq_len"),
    (["--model.max_seq_len=16", "--decoding.max_new_tokens=16"], "decoding.max_new_tokens", "16",
     "lower decoding.max_new_tokens"),
]


@pytest.mark.parametrize("argv, key, shown, fix", VALUE_ERRORS)
def test_value_error_names_key_value_and_fix(argv, key, shown, fix):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    msg = str(info.value)
    assert f"invalid {key} = {shown}" in msg
    assert "expected" in msg
    assert fix in msg
    assert "(set on the command line by `--" in msg
    assert info.value.key == key


# (YAML text, key, value as shown, words the fix must contain)
YAML_VALUE_ERRORS = [
    ("pipeline:\n  stages: true\n", "pipeline.stages", "True", "an int"),
    ("pipeline:\n  stages: '2'\n", "pipeline.stages", "'2'", "an unquoted number"),
    ("pipeline:\n  stages: 2.0\n", "pipeline.stages", "2.0", "--pipeline.stages=2"),
    ("transport:\n  timeout_s: yes\n", "transport.timeout_s", "True", "a float"),
    ("decoding:\n  chat: 1\n", "decoding.chat", "1", "true/false"),
    ("model:\n  source: 123\n", "model.source", "123", "a string"),
    ("model:\n  cache_dir:\n", "model.cache_dir", "None", "a string"),
    ("pipeline:\n  stages: 3\n  split_points: 10,20\n", "pipeline.split_points", "'10,20'", "a YAML list"),
    ("decoding:\n  stop: '###'\n", "decoding.stop", "'###'", "write a list"),
    ("decoding:\n  stop: [1, 2]\n", "decoding.stop", "[1, 2]", "item 1 is not a string"),
    ("decoding:\n  early_exit: on\n", "decoding.early_exit", "True", "one of 'off', 'eager', 'deferred'"),
    ("logging:\n  level: LOUD\n", "logging.level", "'LOUD'", "one of 'DEBUG', 'INFO', 'WARNING', 'ERROR'"),
]


@pytest.mark.parametrize("text, key, shown, fix", YAML_VALUE_ERRORS)
def test_yaml_value_error_names_key_value_fix_and_file(tmp_path, text, key, shown, fix):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(["--config", path])
    msg = str(info.value)
    assert f"invalid {key} = {shown}" in msg
    assert fix in msg
    assert f"(set in {path})" in msg


def test_constructor_validates_without_loader():
    with pytest.raises(ConfigError, match=r"invalid pipeline\.stages = 0"):
        PipelineConfig(stages=0)
    with pytest.raises(ConfigError, match=r"invalid pipeline\.stages = False"):
        PipelineConfig(stages=False)
    with pytest.raises(ConfigError, match=r"invalid model = \{\}"):
        RunConfig(model={})
    with pytest.raises(ConfigError, match=r"decoding\.max_new_tokens"):
        RunConfig(model=ModelConfig(max_seq_len=8), decoding=DecodingConfig(max_new_tokens=8))
    assert TransportConfig(timeout_s=3).timeout_s == 3.0


# ------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("pipline:\n  stages: 2\n", ["unknown key `pipline` in", "did you mean `pipeline`?"]),
        ("pipeline:\n  stage: 2\n", ["unknown key `pipeline.stage` in", "did you mean `pipeline.stages`?"]),
        ("decoding:\n  max_tokens: 2\n", ["`decoding.max_tokens`", "did you mean `decoding.max_new_tokens`?"]),
        ("zzz: 1\n", ["unknown key `zzz`", "valid choices: `model`, `pipeline`"]),
    ],
)
def test_unknown_yaml_key_suggests(tmp_path, text, fragments):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(["--config", path])
    for fragment in fragments:
        assert fragment in str(info.value)
    assert path in str(info.value)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--pipeline.stage=2"], ["unknown option `--pipeline.stage`", "did you mean `--pipeline.stages`?"]),
        (["--pipline.stages=2"], ["`--pipline.stages`", "did you mean `--pipeline.stages`?"]),
        (["--model.stages=2"], ["`--model.stages`", "did you mean `--pipeline.stages`?"]),
        (["--pipeline.stages.x=2"], ["`--pipeline.stages.x`", "did you mean `--pipeline.stages`?"]),
        (["--stages=2"], ["unknown argument `--stages=2`", "--section.key=value", "did you mean `--pipeline.stages`?"]),
        (["--help"], ["unknown argument `--help`"]),
        (["hello"], ["unexpected argument `hello`", "--section.key=value", "--config PATH"]),
        (["-v"], ["unexpected argument `-v`"]),
        (["--pipeline.stages"], ["`--pipeline.stages` needs a value"]),
        (["--pipeline.stages", "--decoding.chat"], ["`--pipeline.stages` needs a value"]),
        (["--config"], ["`--config` needs a value"]),
        (["--config=a.yaml", "--config=b.yaml"], ["--config given twice", "a.yaml", "b.yaml"]),
    ],
)
def test_bad_cli_argument(argv, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("- a\n- b\n", ["must be a mapping of sections", "got a list", "configs/smollm2-135m.yaml"]),
        ("just text\n", ["must be a mapping of sections", "got a str"]),
        ("pipeline: 3\n", ["section `pipeline`", "must be a mapping", "got 3"]),
        ("pipeline: [stages\n", ["is not valid YAML"]),
    ],
)
def test_bad_yaml_file(tmp_path, text, fragments):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(["--config", path])
    for fragment in fragments:
        assert fragment in str(info.value)
    assert path in str(info.value)


def test_missing_yaml_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"config file `.*nope\.yaml` not found.*--config configs/smollm2-135m"):
        load_config(["--config", missing])
    with pytest.raises(ConfigError, match="not found"):
        load_config([], defaults_file=missing)


def test_argv_must_be_a_list():
    with pytest.raises(TypeError):
        load_config("--pipeline.stages=2")


# ------------------------------------------------------------- printing and help


def test_dump_yaml_round_trips(tmp_path):
    cfg = load_config([
        "--pipeline.stages=3", "--pipeline.split_points=4,9", "--decoding.stop=[\"\\n\\n\", \"a,b\", \"#\", \"off\"]",
        "--model.source=bundled:x", "--decoding.early_exit=eager", "--decoding.chat=yes",
        "--transport.timeout_s=2.5",
    ])
    for comments in (False, True):
        path = write_yaml(tmp_path, dump_yaml(cfg, comments=comments))
        assert load_config(["--config", path]) == cfg


def test_config_to_dict_is_plain_and_deep():
    cfg = RunConfig()
    d = config_to_dict(cfg)
    assert d["pipeline"] == {"stages": 1, "split_points": [], "threads": 0, "pin_cpus": True, "compile": "auto",
                             "compile_warmup": True, "row_invariant": "auto"}
    d["pipeline"]["split_points"].append(1)
    assert cfg.pipeline.split_points == []


def test_every_field_has_a_docstring_and_appears_in_help():
    docs = field_docs()
    help_text = config_help()
    for section, body in config_to_dict(RunConfig()).items():
        assert docs[section]
        for key in body:
            dotted = f"{section}.{key}"
            assert docs[dotted], dotted
            assert "\n" not in docs[dotted]
            assert f"--{dotted} " in help_text
            assert docs[dotted] in help_text
    assert "--model.dtype {auto,float32,bfloat16,float16}  (default: auto)" in help_text
    assert "--pipeline.split_points INT,INT,...  (default: [])" in help_text
    assert "--transport.timeout_s FLOAT  (default: 60.0)" in help_text


# ------------------------------------------------------------- world size


@pytest.mark.parametrize(
    "stages, backend, world_size, fragments",
    [
        (1, "inprocess", 1, None),
        (3, "inprocess", 1, None),
        (3, "gloo", 3, None),
        (2, "nccl", 2, None),
        (3, "inprocess", 3, ["transport.backend = 'inprocess'", "WORLD_SIZE=3", "--transport.backend=gloo"]),
        (3, "gloo", 2, ["pipeline.stages = 3", "WORLD_SIZE=2", "--nproc-per-node=3", "--pipeline.stages=2"]),
    ],
)
def test_check_world_size(stages, backend, world_size, fragments):
    pipeline, transport = PipelineConfig(stages=stages), TransportConfig(backend=backend)
    if fragments is None:
        check_world_size(pipeline, transport, world_size)
        return
    with pytest.raises(ConfigError) as info:
        check_world_size(pipeline, transport, world_size)
    for fragment in fragments:
        assert fragment in str(info.value)



@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(["--config", str(path)])
    assert cfg.model.source.startswith("bundled:")
