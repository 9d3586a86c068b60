"""Packaging: the library lives in python/flexiq_tvm; schedules/ and target/ install inside it."""

from setuptools import find_packages, setup

lib_packages = find_packages("python")


def _mapped(folder: str) -> list[str]:
    """``folder`` and its subpackages, named inside flexiq_tvm."""
    subs = [folder] + [f"{folder}.{q}" for q in find_packages(folder)]
    return [f"flexiq_tvm.{p}" for p in subs]


schedule_packages = _mapped("schedules")
target_packages = _mapped("target")

package_dir = {"flexiq_tvm": "python/flexiq_tvm"}
for pkg in schedule_packages + target_packages:
    top, _, rest = pkg.partition(".")[2].partition(".")
    package_dir[pkg] = top + ("/" + rest.replace(".", "/") if rest else "")

setup(
    packages=lib_packages + schedule_packages + target_packages,
    package_dir=package_dir,
    package_data={
        "flexiq_tvm.zoo": ["checkpoints/*.pt", "checkpoints/manifest.json",
                       "checkpoints/finetuned/*"],
        "flexiq_tvm.schedules": ["**/*.json"],
        "flexiq_tvm.target": ["**/*.c", "**/*.h", "**/*.md"],
    },
)
