"""Build and install megalite; compiles the C++ dataset index builder in csrc/ with pybind11."""
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ROOT = Path(__file__).parent

extension = Pybind11Extension(
    "megalite._C",
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")),
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="megalite",
    version="0.1.0",
    description="Megatron-style 5D-parallel training of GPT models (dense and MoE) on PyTorch",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megalite", "megalite.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": build_ext},
    # Any torch from 2.4 on works; CPU machines should install torch==2.13.0 (see README).
    install_requires=["torch>=2.4", "numpy>=1.24", "tokenizers>=0.15", "safetensors>=0.4", "tensorboard>=2.14", "tqdm>=4.60"],
    extras_require={
        # transformers: the reference for the Hugging Face import/export tests (tiny models built in the tests);
        # wandb: --wandb-project is tested offline (install it to use that flag)
        "test": ["pytest>=7", "pytest-xdist>=3", "transformers>=4.57", "wandb>=0.19"],
        # Optional fast kernels, imported lazily. Never the PyPI package named "apex".
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
    entry_points={"console_scripts": ["megalite=megalite.cli:main"]},
)
