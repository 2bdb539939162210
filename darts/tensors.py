"""Reading and writing a scope's persistable tensors as numpy arrays."""
import numpy as np


def set_tensors(scope, place, arrays):
    """Write numpy arrays into the scope's persistable tensors (creating them)."""
    for name, value in arrays.items():
        scope.var(name).get_tensor().set(np.ascontiguousarray(value, dtype='float32'), place)


def get_tensors(scope, names):
    return {n: np.array(scope.find_var(n).get_tensor()) for n in names}
