"""Packaging: no runtime dependency, the command exists, and the README and CI agree."""

from __future__ import annotations

import ast
import configparser
import re
import subprocess
import sys
from pathlib import Path

import uwsgi_fastrouter

ROOT = Path(__file__).resolve().parent.parent


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None)
    assert cfg.read(ROOT / "setup.cfg"), "setup.cfg is missing"
    return cfg


def cfg_list(value: str) -> list:
    return [line.strip() for line in value.replace(";", "\n").splitlines() if line.strip()]


def test_no_runtime_dependencies():
    cfg = setup_cfg()
    assert cfg.has_section("options")
    assert cfg_list(cfg.get("options", "install_requires", fallback="")) == []
    assert "setup_requires" not in cfg["options"]


def test_metadata():
    cfg = setup_cfg()
    assert cfg.get("metadata", "name") == "uwsgi-fastrouter"
    assert cfg.get("metadata", "version") == "attr: uwsgi_fastrouter.__version__"
    assert cfg.get("options", "python_requires").replace(" ", "") == ">=3.9"
    assert cfg_list(cfg.get("options", "packages")) == ["uwsgi_fastrouter"]
    assert re.match(r"^\d+\.\d+\.\d+", uwsgi_fastrouter.__version__)


def test_version_is_a_literal_setuptools_can_read_without_importing():
    tree = ast.parse((ROOT / "uwsgi_fastrouter" / "__init__.py").read_text())
    values = [node.value.value for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
              and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)]
    assert values == [uwsgi_fastrouter.__version__]


def test_console_script_entry_point():
    cfg = setup_cfg()
    scripts = dict(
        (name.strip(), target.strip())
        for name, _, target in (line.partition("=") for line in
                                cfg_list(cfg.get("options.entry_points", "console_scripts"))))
    assert scripts == {"uwsgi-fastrouter": "uwsgi_fastrouter.cli:main"}
    from uwsgi_fastrouter import cli
    assert callable(cli.main)


def test_man_page_is_installed():
    cfg = setup_cfg()
    files = cfg_list(cfg.get("options.data_files", "share/man/man1"))
    assert files == ["man/uwsgi-fastrouter.1"]
    assert (ROOT / files[0]).is_file()


def test_test_dependencies_are_extras_not_requirements():
    cfg = setup_cfg()
    extras = cfg_list(cfg.get("options.extras_require", "test"))
    assert "pytest" in extras and "hypothesis" in extras


def test_module_entry_point_prints_the_version():
    done = subprocess.run([sys.executable, "-m", "uwsgi_fastrouter", "--version"], cwd=str(ROOT),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert uwsgi_fastrouter.__version__ in done.stdout.decode()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    # The first two lines are the commands themselves, ready to paste on a fresh machine.
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[:2] == [
        "pip install . && uwsgi-fastrouter --fastrouter 127.0.0.1:3017"
        " --fastrouter-subscription-server 127.0.0.1:7000 --fastrouter-stats 127.0.0.1:9191",
        "pip install tox && tox",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*(\S*/)?tox\b", ci, re.M), ".ci/run must run the README's `tox`"
    assert "set -euo pipefail" in ci


def test_tox_default_runs_one_env_with_real_uwsgi():
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    assert cfg_list(tox.get("tox", "env_list").replace(",", "\n")) == ["py3"]
    deps = cfg_list(tox.get("testenv", "deps"))
    assert "uwsgi==2.0.31" in deps
    assert "python -m pytest {posargs:-q}" in tox.get("testenv", "commands")
