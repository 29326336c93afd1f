from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="ebtrain",
    version="0.1.0",
    description="Find Early-Bird tickets and train them: smaller networks for less training cost.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ebtrain", "ebtrain.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "PyYAML>=6.0",
        "tqdm>=4.64",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
    ],
    extras_require={"test": ["pytest>=7.4", "hypothesis>=6.80", "Pillow>=9.0"]},
    entry_points={"console_scripts": ["ebtrain=ebtrain.cli:main"]},
)
