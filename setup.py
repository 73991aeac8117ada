from setuptools import find_packages, setup

setup(
    name="megatron-internvl",
    version="0.1.0",
    description="Train InternVL-family vision-language models at cluster scale on Megatron-Core.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Two top-level folders install inside the package: kernels/ (fused kernels beside their
    # plain-torch references) as megatron_internvl.kernels, slurm/ (the sbatch templates that
    # `megatron-internvl slurm` renders) as megatron_internvl.slurm.
    packages=find_packages(include=["megatron_internvl", "megatron_internvl.*"])
    + ["megatron_internvl.kernels"]
    + ["megatron_internvl.kernels." + p for p in find_packages("kernels")]
    + ["megatron_internvl.slurm"],
    package_dir={"megatron_internvl.kernels": "kernels", "megatron_internvl.slurm": "slurm"},
    package_data={"megatron_internvl.slurm": ["*.sbatch"]},
    install_requires=[
        # 0.17+ needs Python >= 3.12; 0.16.1 has wheels for cp311 and cp312 (CPU CI and GPU nodes).
        "megatron-core==0.16.1",
        "torch>=2.6",
        "pyyaml",
        "pillow",
        "sentencepiece",
        "safetensors",
        "tokenizers",
        "numpy",
        # dist_checkpointing's filesystem writer needs it.
        "psutil",
    ],
    extras_require={
        # GPU nodes: only what the code imports there. Transformer Engine must match the installed
        # torch build: an NGC PyTorch container has both (docs/cluster.md, "Recommended
        # environment"); this extra is for a plain virtualenv. torch >= 2.10: the local spec's
        # packed attention on CUDA (torch.nn.attention.varlen). Never add the package index's
        # `apex`: it is an unrelated project.
        "gpu": [
            "torch>=2.10",
            "transformer-engine[pytorch]",
        ],
        # DALI's GPU image decoding (data.image_backend=dali), one wheel per CUDA major version:
        # nvidia-dali-cuda130 needs a driver for CUDA 13 (>= 580), nvidia-dali-cuda120 one for
        # CUDA 12 (>= 525). `megatron-internvl doctor` warns when the wheel is newer than the driver.
        "dali-cuda13": ["nvidia-dali-cuda130"],
        "dali-cuda12": ["nvidia-dali-cuda120"],
        "dali-cpu": ["nvidia-dali-cuda130"],  # CPU decoding only: any driver, or none
        "test": [
            "pytest",
            "pytest-timeout",
            "transformers>=5",
            "matplotlib",
            "scikit-learn",
            "tensorboard",
            "av",
            "nvidia-dali-cuda130",
            # Triton kernels (kernels/) are tested on CPU under TRITON_INTERPRET=1.
            "triton",
            "wandb",
        ],
        "wandb": ["wandb"],
        "dev": ["pytest", "pytest-timeout", "transformers>=5", "matplotlib", "tensorboard"],
    },
    entry_points={"console_scripts": ["megatron-internvl=megatron_internvl.cli:main"]},
)
