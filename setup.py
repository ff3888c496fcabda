from setuptools import find_packages, setup

setup(
    name="massl",
    version="0.1.0",
    description="MaSSL self-supervised pretraining of vision transformers at scale",
    python_requires=">=3.10",
    packages=find_packages(include=["massl", "massl.*"]),
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "timm>=1.0,<1.1",
        "pyyaml>=6",
        "numpy",
        "pillow",
        "opencv-python-headless>=4.8",  # CPU augmentation (massl/data/augment/cpu.py); opencv-python serves too
        "simplejpeg>=1.6",  # faster JPEG decode in the loader workers (PIL's is the fallback)
        "safetensors>=0.4",
        "tensorboard>=2.14",
    ],
    extras_require={
        "webdataset": ["webdataset==1.0.2"],
        # engine.name=deepspeed; install after torch with --no-build-isolation (scripts/setup_env.sh)
        "deepspeed": ["deepspeed==0.19.8"],
        "quickstart": ["scikit-learn>=1.3", "matplotlib>=3.7"],
        "report": ["matplotlib>=3.7", "scikit-learn>=1.3"],  # massl-report
        "dev": ["pytest>=7", "pytest-xdist==3.8.0", "mypy==2.4.1", "scikit-learn>=1.3", "matplotlib>=3.7", "scikit-image>=0.22",
                "webdataset==1.0.2", "mutmut==3.8.1"],  # mutmut: scripts/mutation.sh
    },
    entry_points={
        "console_scripts": [
            "massl-train=massl.cli:train_main",
            "massl-eval=massl.cli:eval_main",
            "massl-export=massl.cli:export_main",
            "massl-shard=massl.tools.shard:main",
            "massl-report=massl.report.cli:main",
        ]
    },
)
