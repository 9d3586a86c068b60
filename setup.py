"""Packaging: the library lives in python/flexiq_tvm; schedules/ and target/ install inside it."""

from setuptools import find_packages, setup

lib_packages = find_packages("python")
schedule_packages = ["flexiq_tvm.schedules" + p[len("schedules"):]
                     for p in ["schedules"] + ["schedules." + q for q in find_packages("schedules")]]
target_packages = ["flexiq_tvm.target" + p[len("target"):]
                   for p in ["target"] + ["target." + q for q in find_packages("target")]]

package_dir = {"flexiq_tvm": "python/flexiq_tvm"}
for pkg in schedule_packages + target_packages:
    top, _, rest = pkg.partition(".")[2].partition(".")
    package_dir[pkg] = top + ("/" + rest.replace(".", "/") if rest else "")

setup(
    packages=lib_packages + schedule_packages + target_packages,
    package_dir=package_dir,
    package_data={
        "flexiq_tvm.zoo": ["checkpoints/*.pt", "checkpoints/manifest.json"],
        "flexiq_tvm.schedules": ["**/*.json"],
        "flexiq_tvm.target": ["**/*.c", "**/*.h", "**/*.md"],
    },
)
