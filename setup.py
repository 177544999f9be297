"""Maps the four stage folders onto one import package, ``rrise``.

``sdk/`` is ``rrise``; ``calibrate/``, ``export/`` and ``runtime/`` are ``rrise.calibrate``,
``rrise.export`` and ``rrise.runtime``. Every subpackage of every stage folder is listed, which is
what setuptools needs for both editable and wheel installs.
"""

from setuptools import find_packages, setup

STAGES = {
    "rrise": "sdk",
    "rrise.calibrate": "calibrate",
    "rrise.export": "export",
    "rrise.runtime": "runtime",
}

packages: list[str] = []
package_dir: dict[str, str] = {}
for name, folder in STAGES.items():
    packages.append(name)
    package_dir[name] = folder
    for sub in find_packages(where=folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
