"""Workflow scripts' logging: what reaches the log, and how a TensorFlow job ends."""

import os
import subprocess
import sys
import textwrap


def _run_script(tmp_path, body: str, env=None) -> subprocess.CompletedProcess:
    """Run ``body`` inside ``rule_logging``; a file "after" marks that the line after the
    block ran."""
    script = "\n".join([
        "from n6qat.rulelog import rule_logging",
        f"with rule_logging({str(tmp_path / 'rule.log')!r}) as log:",
        textwrap.indent(textwrap.dedent(body).strip(), "    "),
        f"open({str(tmp_path / 'after')!r}, 'w').write('reached')",
    ])  # fmt: skip
    (tmp_path / "script.py").write_text(script)  # a file: AutoGraph reads the source
    return subprocess.run([sys.executable, "script.py"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, env=env)  # fmt: skip


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


def test_a_tensorflow_script_leaves_no_autograph_files_in_the_temporary_folder(tmp_path):
    """AutoGraph's converted functions are files in TMPDIR, deleted by an exit handler
    that ``os._exit`` skips: the early exit deletes them itself."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    done = _run_script(tmp_path, """
        import tensorflow as tf
        @tf.function
        def f(x):
            if x > 0:  # a Python condition on a tensor: AutoGraph converts f
                return x
            return -x
        log.info("f %d", int(f(tf.constant(-3))))
        import sys
        generated = [n for n in sys.modules if n.startswith("__autograph_generated_file")]
        log.info("generated %d", len(generated))
    """, env={**os.environ, "TMPDIR": str(tmp)})
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "rule.log").read_text()
    assert "f 3" in text and "generated 0" not in text  # the test converts something
    assert not list(tmp.glob("__autograph_generated_file*"))


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
