"""The published parameter and GMACs numbers, read from ``data/published.json`` (one row per published number).

A row names what was measured (a config of ``config/`` or a model name, plus a ``token_reduction`` setting, null for
the plain model), where (resolution, class count), how (a convention of ``counting.CONVENTIONS``), the numbers as
printed, and the paper they come from (``source``: ``hvt``, ``pit``, ``hivit`` or ``expedit-swag``, a key of the
file's ``sources`` with the citation). Adding a published number is adding a row to the data file.
"""
import json
import os
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import List, Optional, Tuple

from framework import counting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_FILE = os.path.join(REPO, 'data', 'published.json')

_REQUIRED = ('config', 'model', 'token_reduction', 'resolution', 'num_classes', 'family', 'convention', 'gmacs',
             'params_m', 'source')
_OPTIONAL = ('note', 'fps', 'throughput', 'acc1')


@dataclass(frozen=True)
class Published:
    """One published number. ``gmacs`` and ``params_m`` are the printed strings ("2.40" keeps its precision);
    ``source`` names the paper (a key of the file's ``sources``) and ``citation`` cites it."""
    config: Optional[str]
    model: Optional[str]
    token_reduction: Optional[dict]
    resolution: int
    num_classes: int
    family: str
    convention: str
    gmacs: str
    params_m: Optional[str]
    source: str
    citation: str
    note: Optional[str] = None
    fps: Optional[str] = None          # Expedit-SWAG: images/s at batch 1, as printed
    throughput: Optional[str] = None   # Expedit-SWAG: images/s at a large batch, as printed
    acc1: Optional[str] = None         # Expedit-SWAG: ImageNet top-1, as printed

    @property
    def label(self) -> str:
        """The config name, or the model with its setting and resolution for a row without a config."""
        if self.config:
            return self.config
        setting = '' if self.token_reduction is None else ' ' + json.dumps(self.token_reduction, sort_keys=True)
        return f'{self.model}{setting} @{self.resolution}'


def load(path: str = DATA_FILE) -> List[Published]:
    """Every row of the data file, checked (a ValueError names the row and the field that is wrong)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"published numbers file '{path}' cannot be read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"published numbers file '{path}' is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict) or not isinstance(data.get('rows'), list) or \
            not isinstance(data.get('sources'), dict):
        raise ValueError(f"published numbers file '{path}' must hold an object with 'sources' and 'rows'")
    return [_row(raw, i, data['sources'], path) for i, raw in enumerate(data['rows'])]


def _row(raw, index: int, sources: dict, path: str) -> Published:
    where = f"{path}, row {index}"
    if not isinstance(raw, dict):
        raise ValueError(f'{where}: a row must be a JSON object')
    missing = [k for k in _REQUIRED if k not in raw]
    unknown = [k for k in raw if k not in _REQUIRED + _OPTIONAL]
    if missing or unknown:
        raise ValueError(f'{where}: ' + '; '.join(([f"missing {', '.join(missing)}"] if missing else [])
                                                  + ([f"unknown {', '.join(unknown)}"] if unknown else [])))
    if (raw['config'] is None) == (raw['model'] is None):
        raise ValueError(f'{where}: give exactly one of config and model')
    if raw['token_reduction'] is not None and not isinstance(raw['token_reduction'], dict):
        raise ValueError(f'{where}: token_reduction must be a JSON object or null')
    if raw['convention'] not in counting.CONVENTIONS:
        raise ValueError(f"{where}: unknown convention '{raw['convention']}' (counting.CONVENTIONS has "
                         f"{', '.join(counting.CONVENTIONS)})")
    if raw['source'] not in sources:
        raise ValueError(f"{where}: source '{raw['source']}' is not a key of 'sources'")
    for key in ('gmacs', 'params_m'):
        value = raw[key]
        if (value is not None or key == 'gmacs') and not _is_number_text(value):
            raise ValueError(f'{where}: {key} must be the printed number as a string, e.g. "2.40", got {value!r}')
    for key in ('resolution', 'num_classes'):
        if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
            raise ValueError(f'{where}: {key} must be a positive integer, got {raw[key]!r}')
    return Published(**raw, citation=sources[raw['source']])


def _is_number_text(value) -> bool:
    try:
        return isinstance(value, str) and Decimal(value).is_finite()
    except ArithmeticError:
        return False


def find(rows: List[Published], config: Optional[str], model: str,
         token_reduction: Optional[dict]) -> Optional[Published]:
    """The row published for this config (or, failing that, for this model) at this token-reduction setting."""
    setting = canonical_setting(token_reduction)
    same_setting = [r for r in rows if canonical_setting(r.token_reduction) == setting]
    for row in same_setting:
        if row.config is not None and row.config == config:
            return row
    for row in same_setting:
        if row.config is None and row.model == model:
            return row
    return None


def canonical_setting(spec: Optional[dict]) -> Optional[dict]:
    """A token-reduction spec with the method's defaults filled in, so that a spec that spells out a default matches a
    row that leaves it out (an unknown method is compared as given)."""
    if spec is None:
        return None
    from models.token_reduction import METHODS
    from models.token_reduction.core import REQUIRED
    method = METHODS.get(spec.get('method'))
    if method is None:
        return dict(spec)
    defaults = {k: p.default for k, p in method.params.items() if p.default is not REQUIRED}
    return {**defaults, **spec}


def compare(exact_units: Decimal, printed: Optional[str]) -> Tuple[Optional[float], Optional[bool]]:
    """(exact - printed, rounded to 4 decimals; whether ``exact`` rounds half-up to ``printed`` at its precision)."""
    if printed is None:
        return None, None
    decimals = len(printed.split('.')[1]) if '.' in printed else 0
    rounded = exact_units.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    return round(float(exact_units - Decimal(printed)), 4), rounded == Decimal(printed)
