"""The exported Paddle inference model as ONNX, for ONNX Runtime.

paddle2onnx converts RUN_DIR/inference/model.{json,pdiparams}; ONNX Runtime's basic graph
optimisations (constant folding above all) then fold the flat weight vector's slices into
per-parameter constants, which makes the file about the size of the weights.  Every export is
checked: on a batch of real images the ONNX model's class probabilities must equal Paddle
Inference's to TOLERANCE, or the ONNX file is removed and the Paddle model kept.
"""
import contextlib
import os
import sys

import numpy as np

from darts.errors import UserError

OPSET = 13
TOLERANCE = 1e-4
LOG = 'onnx_export.log'   # what paddle2onnx prints, beside the model


class ConversionError(UserError):
    """paddle2onnx or ONNX Runtime could not make or run the ONNX model."""


def _require():
    try:
        import onnxruntime
        import paddle2onnx
    except ImportError as e:
        raise ConversionError(f'ONNX export needs paddle2onnx and onnxruntime ({e}); '
                              f'pip install -r requirements.txt') from None
    return paddle2onnx, onnxruntime


@contextlib.contextmanager
def _output_to(path):
    """File descriptors 1 and 2 (Python's and the C++ libraries' prints) into path."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, 'ab') as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def session(path):
    """An ONNX Runtime CPU session of the model at path, its warnings off."""
    _, ort = _require()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line
        raise ConversionError(f'ONNX Runtime cannot load {path} ({type(e).__name__}: {str(e)[:200]})') from None


def run(sess, x):
    """The model's output (class probabilities) for the batch x."""
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, 'float32')})[0]


def convert(prefix):
    """prefix.onnx from the Paddle inference model prefix.{json,pdiparams}; a failure is a
    ConversionError (one line) naming the log that holds paddle2onnx's own messages."""
    p2o, ort = _require()
    out, log = prefix + '.onnx', os.path.join(os.path.dirname(prefix), LOG)
    raw = out + '.raw'
    try:
        with _output_to(log):
            model = p2o.export(prefix + '.json', prefix + '.pdiparams', opset_version=OPSET, optimize_tool='none')
            with open(raw, 'wb') as f:
                f.write(model)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            # portable: no fused kernels
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            options.optimized_model_filepath = out + '.tmp'
            ort.InferenceSession(raw, options, providers=['CPUExecutionProvider'])
        os.replace(out + '.tmp', out)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - paddle2onnx fails in many ways, sys.exit(-1) among them
        raise ConversionError(f'ONNX conversion of {prefix} failed ({type(e).__name__}: {str(e)[:200]}); '
                              f'see {log}; the Paddle model is kept') from None
    finally:
        for leftover in (raw, out + '.tmp'):
            if os.path.exists(leftover):
                os.remove(leftover)
    return out


def paddle_probabilities(prefix, x):
    """Paddle Inference's output for x, in a scope of its own."""
    import paddle
    paddle.enable_static()
    exe = paddle.static.Executor(paddle.CPUPlace())
    with paddle.static.scope_guard(paddle.static.Scope()):
        program, feeds, fetches = paddle.static.load_inference_model(prefix, exe)
        return exe.run(program, feed={feeds[0]: x}, fetch_list=fetches)[0]


def export(prefix, x):
    """Convert, then check on the batch x: returns (path of the ONNX model, max |difference|).
    A difference above TOLERANCE removes the ONNX file and raises ConversionError."""
    out = convert(prefix)
    try:
        diff = float(np.abs(run(session(out), x) - paddle_probabilities(prefix, x)).max())
    except Exception as e:  # noqa: BLE001 - ONNX Runtime refusing the model is a failed export too
        os.remove(out)
        message = (str(e) if isinstance(e, ConversionError)
                   else f'ONNX Runtime cannot run {out} ({type(e).__name__}: {str(e)[:200]})')
        raise ConversionError(f'{message}; removed, the Paddle model is kept') from None
    if not diff <= TOLERANCE:
        os.remove(out)
        raise ConversionError(f'the ONNX model\'s probabilities differ from Paddle\'s by {diff:.2e} '
                              f'(> {TOLERANCE:g}) on {len(x)} test images; removed, the Paddle model is kept')
    return out, diff
