"""Configuration: the records (``schema``), their checks (``checks``), finding and
reading the file (``load``), and the documented default file (``default.toml``), which
``ttsd init`` writes and the repository's config.toml copies."""

from ttsd.config.checks import FOLDERS, check_folders, validate
from ttsd.config.load import RETIRED, default_text, dump, from_dict
from ttsd.config.schema import (
    LINES_PER_MODEL_BATCH,
    SECTIONS,
    WRITERS_MAX,
    BatchingConfig,
    CacheConfig,
    ClusterConfig,
    Config,
    DaemonConfig,
    EngineConfig,
    InputConfig,
    MemoryConfig,
    OutputConfig,
    PathsConfig,
)

__all__ = [
    "FOLDERS", "LINES_PER_MODEL_BATCH", "RETIRED", "SECTIONS", "WRITERS_MAX",
    "BatchingConfig", "CacheConfig", "ClusterConfig", "Config", "DaemonConfig",
    "EngineConfig", "InputConfig", "MemoryConfig", "OutputConfig", "PathsConfig",
    "check_folders", "default_text", "dump", "from_dict", "validate",
]
