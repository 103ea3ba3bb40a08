"""Workflow scripts' logging: what reaches the log, and how a TensorFlow job ends."""

import subprocess
import sys
import textwrap


def _run_script(tmp_path, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` inside ``rule_logging``; a file "after" marks that the line after the
    block ran."""
    script = "\n".join([
        "from n6qat.rulelog import rule_logging",
        f"with rule_logging({str(tmp_path / 'rule.log')!r}) as log:",
        textwrap.indent(textwrap.dedent(body).strip(), "    "),
        f"open({str(tmp_path / 'after')!r}, 'w').write('reached')",
    ])  # fmt: skip
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)  # fmt: skip


def test_a_tensorflow_script_ends_at_the_block_with_its_log_and_outputs_written(tmp_path):
    """With TensorFlow imported, a finished block ends the process (exit status 0,
    without the interpreter's teardown): the log and every output closed in it are kept."""
    done = _run_script(tmp_path, f"""
        import tensorflow as tf
        log.info("sum %d", int(tf.reduce_sum(tf.range(4))))
        open({str(tmp_path / "out.txt")!r}, "w").write("written")
        print("stdout line")
    """)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "rule.log").read_text()
    assert "sum 6" in text and "stdout line" in text
    assert (tmp_path / "out.txt").read_text() == "written"
    assert not (tmp_path / "after").exists()  # nothing after the block runs


def test_a_script_without_tensorflow_exits_normally_and_errors_keep_status_1(tmp_path):
    assert _run_script(tmp_path, 'log.info("plain")').returncode == 0
    assert (tmp_path / "after").exists()
    failed = _run_script(tmp_path, """
        from n6qat.errors import N6QATError
        import tensorflow
        raise N6QATError("bad input")
    """)
    assert failed.returncode == 1
    assert "n6qat error: bad input" in failed.stderr
