from distrain.config.schema import ConfigError, JobConfig
from distrain.config.load import load_job, read_config_yaml, write_config_yaml, to_dict

__all__ = ["ConfigError", "JobConfig", "load_job", "read_config_yaml", "write_config_yaml", "to_dict"]
