"""Copies the top-level export/ target profiles into the wheel as ftedge/_data/export/.

Everything else is in pyproject.toml. In a source checkout ftedge reads ../export directly;
an installed wheel has no checkout, so the profiles travel inside the package.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProfiles(build_py):
    def run(self) -> None:
        super().run()
        dst = Path(self.build_lib) / "ftedge" / "_data" / "export"
        dst.mkdir(parents=True, exist_ok=True)
        for profile in sorted((ROOT / "export").glob("*.yaml")):
            shutil.copy2(profile, dst / profile.name)


setup(cmdclass={"build_py": BuildPyWithProfiles})
