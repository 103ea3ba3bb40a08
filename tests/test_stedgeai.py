"""stedgeai: report parsing on composed fixtures (both layouts), command lines, failures,
and whole steps run against the stand-in executable in tests/stand_in."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from n6qat.errors import N6QATError
from n6qat.npu_summary import collect_report, compare_with_host_check, summarize_npu
from n6qat.stedgeai import (
    StedgeaiSettings,
    ToolRun,
    build_command,
    check_ascii_paths,
    locate_stedgeai,
    profile_argument,
    raise_for_failure,
    run_step,
    split_extra_flags,
)
from n6qat.stedgeai_reports import (
    error_lines,
    parse_c_info,
    parse_compact_metrics,
    parse_epochs,
    parse_header,
    parse_memory_pools,
    parse_memory_total,
    parse_profiling,
    parse_report,
    parse_summary,
    parse_validation_table,
    parse_version,
    size_bytes,
)
from n6qat.validation_npz import save_validation_npz

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures/stedgeai"
STAND_IN = HERE / "stand_in/stedgeai"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- parsing ---------------------------------------------------------------------------------


def test_header_and_version_in_both_layouts():
    v3 = parse_header(fixture("v3_analyze_report.txt"))
    assert v3["version"] == "3.0.0-20426 123672867"
    assert v3["created"] == "2025-06-12 14:03:11"
    assert v3["parameters"].startswith("analyze --model /work/results/model_qat_int8.tflite")
    assert parse_header(fixture("v2_analyze_report.txt"))["version"] == "2.0.0-20049"
    assert parse_version("stedgeai, version 10.1.0") == "10.1.0"
    assert parse_version("no version here") is None
    assert parse_header("")["version"] is None


def test_summary_block():
    assert parse_summary(fixture("v3_analyze_report.txt")) == {
        "model_fmt": "ss/sa per channel",
        "params": 57776,
        "macc": 4210944,
        "weights_bytes": 231104,
        "activations_bytes": 301056,
        "ram_total_bytes": 301056,
    }
    older = parse_summary(fixture("v2_analyze_report.txt"))
    assert older["params"] is None and older["macc"] == 1032704  # no "params #" line


def test_memory_pools_and_total():
    pools = parse_memory_pools(fixture("v3_analyze_report.txt"))
    assert [p["name"] for p in pools] == ["npuRAM5", "npuRAM6", "octoFlash"]
    npu5 = pools[0]
    assert npu5["address"] == "0x342E0000" and npu5["size_bytes"] == 448 * 1024
    assert npu5["used_bytes"] == npu5["activations_bytes"] == 294 * 1024
    assert npu5["used_percent"] == pytest.approx(65.63) and npu5["weights_bytes"] == 0
    assert pools[2]["size_bytes"] == 112 * 1024**2
    assert parse_memory_total(fixture("v3_analyze_report.txt"))["activations"] == 294 * 1024
    assert parse_memory_pools(fixture("v2_analyze_report.txt")) == []
    assert parse_memory_total(fixture("v2_analyze_report.txt")) is None


def test_sizes_use_1024():
    assert size_bytes("294.000 kB") == 301056 and size_bytes("0  B") == 0
    assert size_bytes("1.5 MiB") == 1572864 and size_bytes("lots") is None


def test_epochs_newer_layout():
    epochs = parse_epochs(fixture("v3_analyze_report.txt"))
    assert (epochs["total"], epochs["software"], epochs["hybrid"], epochs["hardware"]) == (
        31,
        2,
        1,
        28,
    )
    assert epochs["layout"] == "v3"
    assert [(r["epoch"], r["op"]) for r in epochs["software_ops"]] == [
        (1, "Quantize"),
        (31, "Softmax"),
    ]
    assert [(r["epoch"], r["op"]) for r in epochs["hybrid_ops"]] == [(17, "Mean")]


def test_epochs_older_layout():
    epochs = parse_epochs(fixture("v2_analyze_report.txt"))
    assert (epochs["total"], epochs["software"], epochs["layout"]) == (24, 3, "v2")
    assert epochs["hardware"] == 21 and epochs["hybrid"] == 0
    assert [r["op"] for r in epochs["software_ops"]] == ["Transpose", "Resize", "Softmax"]


def test_no_epoch_block_is_none():
    assert parse_epochs(fixture("header_only_report.txt")) is None
    assert parse_epochs("Total number of epochs: 7") == {
        "total": 7,
        "software": 0,
        "hybrid": None,
        "hardware": 7,
        "layout": "v2",
        "software_ops": [],
        "hybrid_ops": [],
    }


def test_validation_table_every_row_kind():
    rows = parse_validation_table(fixture("v3_validate_report.txt"))
    assert [r["row"] for r in rows] == [
        "TARGET c-model #1",
        "TARGET c-model #2",
        "original model #1",
        "original model #2",
        "X-cross #1",
        "X-cross #2",
    ]
    target = rows[0]
    assert target["kind"] == "TARGET c-model" and target["output"] == 1
    assert target["acc"] == pytest.approx(91.41) and target["rmse"] == pytest.approx(0.031207755)
    assert target["cos"] == pytest.approx(0.994811)
    assert target["tensor"] == "'output_1', 256 x f32(1x10), m_id=[41]"
    assert rows[1]["acc"] is None  # n.a.
    assert rows[4]["kind"] == "X-cross" and rows[4]["acc"] == pytest.approx(99.61)


def test_validation_table_older_rows_missing_cells_and_na():
    rows = parse_validation_table(fixture("v2_validate_report.txt"))
    assert [r["kind"] for r in rows] == ["HOST c-model", "X-cross", "X-cross"]
    assert rows[0]["acc"] is None and rows[0]["l2r"] == pytest.approx(2.01e-7)
    assert rows[1]["l2r"] is None  # n.a. in a number column
    short = rows[2]
    assert short["rmse"] == pytest.approx(0.000412) and short["cos"] is None
    assert short["tensor"] is None


def test_validation_table_absent_or_without_acc_column():
    assert parse_validation_table(fixture("v3_analyze_report.txt")) == []
    text = (
        "Output     rmse      cos       tensor\n"
        "---------------------------------------\n"
        "X-cross #1 0.001000  0.999000  'out', 4 x f32(1x2)\n"
        "\n"
        "X-cross #9 0.5 0.5 'not part of the table'\n"
    )
    [row] = parse_validation_table(text)
    assert row == {
        "row": "X-cross #1",
        "kind": "X-cross",
        "output": 1,
        "rmse": 0.001,
        "cos": 0.999,
        "tensor": "'out', 4 x f32(1x2)",
    }


def test_compact_metrics_and_profiling():
    [compact] = parse_compact_metrics(fixture("v2_validate_report.txt"))
    assert compact["acc"] is None and compact["rmse"] == pytest.approx(7.3e-8)
    assert compact["cos"] == 1.0 and "nse" not in compact
    [with_commas] = parse_compact_metrics(fixture("v3_validate_report.txt"))
    assert with_commas["acc"] == pytest.approx(99.61) and with_commas["nse"] == 0.999992
    profiling = parse_profiling(fixture("v3_validate_report.txt"))
    assert profiling == {
        "samples": 256,
        "ms_per_sample": 11.842,
        "ms_min": 11.801,
        "ms_max": 11.967,
        "ms_std": 0.031,
    }
    assert parse_profiling(fixture("v2_validate_report.txt")) is None
    assert parse_profiling("duration       :   3.5 ms by sample")["ms_min"] is None


def test_c_info_schema_2():
    info = parse_c_info(json.loads(fixture("network_c_info.json")))
    assert info["schema_version"] == "2.0" and info["version"] == "3.0.0-20426"
    assert info["memory_footprint"]["weights"] == 231104
    assert info["memory_pools"][0] == {
        "name": "npuRAM5",
        "size_bytes": 458752,
        "used_size_bytes": 301056,
        "address": "0x342e0000",
        "rights": "ACC_WRITE",
    }
    assert info["node_mapping"] == {
        "NODE_SW": 2,
        "NODE_HW": 2,
        "NODE_SW_HW": 1,
        "NODE_EC": 1,
        "NODE_UNDEF": 1,
    }
    assert info["software_nodes"] == ["Quantize_0", "Softmax_19"]
    assert info["hybrid_nodes"] == ["Mean_17"]


def test_c_info_missing_blocks_give_nulls():
    info = parse_c_info({"environment": {"tools": []}, "graphs": []})
    assert info["version"] is None and info["memory_footprint"] is None
    assert info["memory_pools"] == [] and info["node_mapping"] == {}
    assert parse_c_info({"environment": {"tools": [{"version": "2.1.0"}]}})["version"] == "2.1.0"


@pytest.mark.parametrize(
    "name", ["header_only_report.txt", "console_e801.txt", "v2_validate_report.txt", ""]
)
def test_any_text_parses_without_raising(name):
    report = parse_report(fixture(name) if name else "\x00 garbage \n| epoch_x | ? |\n")
    assert set(report) >= {"header", "summary", "epochs", "validation", "errors"}


def test_error_lines():
    [e801] = error_lines(fixture("console_e801.txt"))
    assert (e801["code"], e801["kind"]) == ("E801", "HwIOError")
    assert e801["message"].startswith("No SERIAL COM port detected")
    assert error_lines(fixture("console_e103.txt"))[0]["code"] == "E103"
    assert error_lines(fixture("console_timeout.txt"))[0]["code"] == "Timeout"
    assert error_lines(fixture("v3_validate_report.txt")) == []


# --- command lines and failures ---------------------------------------------------------------


def test_commands_are_argument_lists():
    settings = StedgeaiSettings(
        profile="n6-noextmem@my profile.json", extra_flags="-O 'ram' --seed 3"
    )
    exe, model = Path("/opt/st/stedgeai"), Path("/w/model.tflite")
    analyze = build_command("analyze", exe, model, settings, Path("/o"), Path("/ws"))
    assert analyze == [
        "/opt/st/stedgeai", "analyze", "--model", "/w/model.tflite", "--target", "stm32n6",
        "--st-neural-art", f"n6-noextmem@{Path('my profile.json').resolve()}", "--name", "network",
        "--output", "/o", "--workspace", "/ws", "-O", "ram", "--seed", "3",
    ]  # fmt: skip
    validate = build_command(
        "validate", exe, model, StedgeaiSettings(), Path("/o"), Path("/ws"), Path("i"), Path("r")
    )
    assert validate[6:8] == ["--st-neural-art", "--name"]  # no value: the default profile
    tail = validate[validate.index("--mode") :]
    assert tail == [
        "--mode", "target", "-d", "serial:921600", "--valinput", "i", "--valoutput", "r",
        "--classifier",
    ]  # fmt: skip
    with pytest.raises(N6QATError, match="validation inputs"):
        build_command("validate", exe, model, StedgeaiSettings(), Path("/o"), Path("/ws"))


def test_the_profile_file_is_made_absolute():
    assert profile_argument("default@/etc/n6.json") == "default@/etc/n6.json"
    assert profile_argument("n6@cfg/n6.json") == f"n6@{Path('cfg/n6.json').resolve()}"
    assert profile_argument("allmems--O3") == "allmems--O3"  # a built-in profile name


def test_extra_flags_are_split_not_interpreted():
    assert split_extra_flags("--name 'a; rm -rf ~' $HOME") == ["--name", "a; rm -rf ~", "$HOME"]
    with pytest.raises(N6QATError, match="cannot be split"):
        split_extra_flags("--name 'unclosed")
    with pytest.raises(N6QATError, match=r"--mode host.*E102"):
        split_extra_flags("--mode host")
    with pytest.raises(N6QATError, match="E102"):
        split_extra_flags("--mode=host")
    assert split_extra_flags("--mode host", target="stm32h7") == ["--mode", "host"]


def test_non_ascii_paths_are_refused_before_the_call():
    check_ascii_paths([Path("/work/results/model.tflite")])
    with pytest.raises(N6QATError, match=r"jörg.*non-ASCII.*E103"):
        check_ascii_paths([Path("/home/jörg/model.tflite")])


@pytest.mark.parametrize(
    ("console", "code", "advice"),
    [
        ("console_e801.txt", "E801", "NPU_Validation firmware"),
        ("console_e103.txt", "E103", "non-ASCII"),
        ("console_e102.txt", "E102", "--mode host is not supported"),
        ("console_timeout.txt", "Timeout", "reset it"),
    ],
)
def test_failures_quote_the_tool_and_advise(console, code, advice):
    run = ToolRun(["stedgeai", "validate"], 1, fixture(console), 0.1)
    with pytest.raises(N6QATError) as caught:
        raise_for_failure(run, "validate")
    message = str(caught.value)
    assert "stedgeai validate failed (exit status 1)" in message
    assert error_lines(fixture(console))[0]["line"] in message and advice in message


def test_an_error_line_fails_even_with_exit_status_zero():
    run = ToolRun(["stedgeai", "analyze"], 0, "E010(InvalidModelError): bad model\n", 0.1)
    with pytest.raises(N6QATError, match=r"exit status 0\): E010\(InvalidModelError\)"):
        raise_for_failure(run, "analyze")
    raise_for_failure(ToolRun(["stedgeai"], 0, "all fine\n", 0.1), "analyze")
    with pytest.raises(N6QATError, match=r"exit status 3\): first\nlast words\nCommand"):
        raise_for_failure(ToolRun(["stedgeai"], 3, "first\nlast words\n", 0.1), "generate")


def test_locating_the_tool(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert locate_stedgeai("") == (None, [f"PATH: {tmp_path}"])
    assert locate_stedgeai(str(tmp_path / "nope")) == (None, [str(tmp_path / "nope")])
    assert locate_stedgeai(str(STAND_IN))[0] == STAND_IN
    monkeypatch.setenv("PATH", str(STAND_IN.parent))
    assert locate_stedgeai("")[0] == STAND_IN


# --- whole steps with the stand-in ---------------------------------------------------------------


@pytest.fixture
def model_files(tmp_path):
    model = tmp_path / "model_ptq_int8.tflite"
    model.write_bytes(b"TFL3 stand-in bytes" * 10)
    npz = tmp_path / "model_ptq_int8_validation.npz"
    save_validation_npz(npz, np.zeros((4, 3, 2, 1), np.float32), np.ones((4, 3), np.float32))
    return model, npz


def test_steps_with_the_stand_in_end_to_end(model_files, tmp_path):
    model, npz = model_files
    settings = StedgeaiSettings(path=str(STAND_IN), board=True, extra_flags="--seed 7")
    folders = {
        step: tmp_path / "npu/stedgeai/ptq" / step for step in ("analyze", "generate", "validate")
    }
    for step, folder in folders.items():
        record = run_step(step, model, settings, folder, validation_npz=npz, timeout_s=60)
        assert record["available"] and record["returncode"] == 0
        assert record["version"] == "3.0.0-20426 123672867"
    argv = json.loads((folders["validate"] / "output/stand_in_argv.json").read_text())
    assert argv["argv"][argv["argv"].index("--valinput") + 1].endswith("data/valinput.npy")
    assert argv["unknown"] == ["--seed", "7"] and argv["cwd"] == str(folders["validate"].resolve())
    assert np.load(folders["validate"] / "data/valoutput.npy").shape == (4, 3)
    report = collect_report("ptq", folders)
    head = report["headline"]
    assert report["available"] and report["version"] == "3.0.0-20426 123672867"
    assert head["weights_bytes"] == model.stat().st_size  # the stand-in's tell: --model arrived
    assert head["macc"] == 82656 and head["activations_bytes"] == 10400
    assert head["epochs"]["software"] == 2 and head["memory_pools"][0]["name"] == "npuRAM5"
    assert [r["kind"] for r in head["validation"]] == [
        "TARGET c-model",
        "original model",
        "X-cross",
    ]
    assert head["profiling"]["samples"] == 16
    assert report["c_info"]["software_nodes"] == ["Quantize_0"]


def test_the_older_layout_end_to_end(model_files, tmp_path, monkeypatch):
    monkeypatch.setenv("STEDGEAI_STAND_IN_LAYOUT", "v2")
    folder = tmp_path / "analyze"
    run_step("analyze", model_files[0], StedgeaiSettings(path=str(STAND_IN)), folder)
    epochs = collect_report("ptq", {"analyze": folder})["headline"]["epochs"]
    assert epochs["layout"] == "v2" and [r["op"] for r in epochs["software_ops"]] == [
        "Quantize",
        "Dequantize",
    ]


@pytest.mark.parametrize("status", ["1", "0"])
def test_a_failing_tool_fails_the_step_with_its_line(model_files, tmp_path, monkeypatch, status):
    monkeypatch.setenv("STEDGEAI_STAND_IN_FAIL", "E801")
    monkeypatch.setenv("STEDGEAI_STAND_IN_FAIL_STATUS", status)
    settings = StedgeaiSettings(path=str(STAND_IN), board=True)
    folder = tmp_path / "validate"
    with pytest.raises(N6QATError, match=rf"(?s)exit status {status}\): E801\(HwIOError\).*serial"):
        run_step("validate", model_files[0], settings, folder, validation_npz=model_files[1])
    assert json.loads((folder / "run.json").read_text())["returncode"] == int(status)


def test_without_the_tool_only_the_host_check_runs(model_files, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    folder = tmp_path / "analyze"
    record = run_step("analyze", model_files[0], StedgeaiSettings(), folder)
    assert record["available"] is False and "only the host check ran" in caplog.text
    report = collect_report("ptq", {"analyze": folder, "generate": tmp_path / "missing"})
    assert report["available"] is False and report["looked_in"] == [f"PATH: {tmp_path / 'empty'}"]
    assert "only the host check ran" in report["message"]
    with pytest.raises(N6QATError, match=r"not found \(looked in PATH: .*required is true"):
        run_step("analyze", model_files[0], StedgeaiSettings(required=True), folder)
    wrong = StedgeaiSettings(path=str(tmp_path / "st/stedgeai"))
    with pytest.raises(N6QATError, match=r"stedgeai.path is '.*st/stedgeai', which is not"):
        run_step("analyze", model_files[0], wrong, folder)


def test_non_ascii_workspace_stops_before_the_call(model_files, tmp_path):
    folder = tmp_path / "résultats/analyze"
    with pytest.raises(N6QATError, match="E103"):
        run_step("analyze", model_files[0], StedgeaiSettings(path=str(STAND_IN)), folder)
    assert not (folder / "output").exists()  # the tool never ran


def test_a_step_folder_without_report_is_tolerated(tmp_path):
    folder = tmp_path / "generate"
    (folder / "output").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"available": True, "version": None}))
    (folder / "console.txt").write_text(fixture("v2_analyze_report.txt"))
    report = collect_report("qat", {"generate": folder})
    assert report["headline"]["macc"] == 1032704  # read from the console output instead
    assert report["version"] == "2.0.0-20049" and report["c_info"] is None
    shutil.rmtree(folder / "output")
    assert collect_report("qat", {"generate": folder})["headline"]["validation"] == []


# --- host check beside the tool ---------------------------------------------------------------


HOST = {
    "clean": True,
    "error_count": 0,
    "warning_count": 1,
    "macc": 80000,
    "memory": {"weights_bytes": 200, "peak_activation_bytes": 10000, "fits": "one npuRAM bank"},
    "operators": [
        {"index": 0, "opcode": "QUANTIZE", "unit": "CPU"},
        {"index": 1, "opcode": "CONV_2D", "unit": "NPU"},
    ],
    "metrics": {"HOST int8 vs float": {"cos": 0.99}},
}


def test_comparison_with_and_without_the_tool():
    tool = {
        "available": True,
        "version": "3.0.0",
        "headline": {
            "macc": 82656,
            "weights_bytes": 400,
            "activations_bytes": 10400,
            "epochs": {"software": 1, "software_ops": [{"epoch": 1, "op": "Quantize"}]},
            "validation": [],
        },
    }
    both = compare_with_host_check(HOST, tool)
    assert both["comparison"]["macc"] == {
        "host": 80000,
        "stedgeai": 82656,
        "stedgeai_over_host": pytest.approx(1.0332),
    }
    assert both["comparison"]["weights_bytes"]["stedgeai_over_host"] == 2.0
    assert both["host"]["cpu_ops"] == ["0 QUANTIZE"] and both["stedgeai"]["software_ops"] == [
        "Quantize"
    ]
    alone = compare_with_host_check(HOST, {"available": False, "message": "not found"})
    assert alone["comparison"] is None and alone["stedgeai"] == {
        "available": False,
        "message": "not found",
    }
    summary = summarize_npu({"ptq": HOST, "qat": HOST}, {"ptq": tool, "qat": {"available": False}})
    assert set(summary["models"]) == {"ptq", "qat"} and summary["stedgeai_available"] is True
    empty = {"available": True, "headline": {"macc": None, "epochs": None}}
    assert compare_with_host_check(HOST, empty)["comparison"]["macc"]["stedgeai_over_host"] is None
