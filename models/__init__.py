"""Model zoo: ``create_model(name, **kwargs)``, ``list_models()``, ``load_pretrained(model, path)``.

Every model is also registered in timm under the same (project-unique) name.
"""
from .convert import CheckpointError, ClassCountError, load_checkpoint_file, extract_state_dict, load_pretrained
from .token_reduction import apply_token_reduction, token_schedule
from .registry import UnknownModelError, create_model, data_config, list_models, model_arg_names, model_class
from . import vit, hvt, pit, hivit  # noqa: F401  (registers the models)

__all__ = ['create_model', 'list_models', 'load_pretrained', 'model_arg_names', 'model_class', 'data_config',
           'load_checkpoint_file', 'extract_state_dict', 'CheckpointError', 'ClassCountError',
           'UnknownModelError', 'apply_token_reduction', 'token_schedule']
