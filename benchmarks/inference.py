"""Inference speed of the exported network: ONNX Runtime against Paddle Inference, as JSON.

    python benchmarks/inference.py                                  # the paper's CIFAR network, batch 1 and 64
    python benchmarks/inference.py --init_channels 16 --layers 8 --batch_sizes 1,16

Builds train.py's test program (DARTS_V2 by default, random weights, BN statistics at their
initial values), exports it as train.py does (inference/model + model.onnx, checked to 1e-4),
then times, for each batch size, the median of --steps runs after --warmup of
paddle.inference's predictor (CPU, --threads threads; with oneDNN, Paddle's default, and
without), of the static Executor on the loaded model (what train.py --predict runs) and of
an ONNX Runtime CPU session (--threads intra-op threads).
"""
import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from timing import median_seconds  # noqa: E402


def export(arch, init_channels, layers, folder):
    """train.py's inference model and its ONNX twin for the network, in folder; their prefix."""
    import numpy as np
    from darts import process
    process.prepare()   # before paddle is imported
    import paddle
    from darts import tensors
    import genotypes
    from darts import onnx_export
    import train
    from darts import training
    paddle.enable_static()
    args = train.parse_args(['--arch', arch, '--init_channels', str(init_channels), '--layers', str(layers)])
    progs = training.build_programs(genotypes.by_name(arch), args)
    scope, place = paddle.static.Scope(), paddle.CPUPlace()
    exe = paddle.static.Executor(place)
    with paddle.static.scope_guard(scope):
        tensors.set_tensors(scope, place, training.initial_state(progs['layout'], 0))
        prefix = training.export_inference(exe, progs, folder, dict(image_size=32, mean=[0.5] * 3, std=[0.25] * 3))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype('float32')
    _, diff = onnx_export.export(prefix, x)
    return prefix, diff


def paddle_predictor(prefix, threads, onednn=True):
    from paddle import inference
    config = inference.Config(prefix + '.json', prefix + '.pdiparams')
    config.disable_gpu()
    if not onednn:
        config.disable_mkldnn()
    config.set_cpu_math_library_num_threads(threads)
    config.disable_glog_info()
    predictor = inference.create_predictor(config)
    handle_in = predictor.get_input_handle(predictor.get_input_names()[0])
    handle_out = predictor.get_output_handle(predictor.get_output_names()[0])

    def run(x):
        handle_in.copy_from_cpu(x)
        predictor.run()
        return handle_out.copy_to_cpu()
    return run


def paddle_executor(prefix):
    """The model as --predict runs it: loaded into a static program, run by an Executor."""
    import paddle
    paddle.enable_static()
    exe = paddle.static.Executor(paddle.CPUPlace())
    program, feeds, fetches = paddle.static.load_inference_model(prefix, exe)
    return lambda x: exe.run(program, feed={feeds[0]: x}, fetch_list=fetches)[0]


def onnx_session(path, threads):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    sess = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='DARTS_V2')
    p.add_argument('--init_channels', type=int, default=36)
    p.add_argument('--layers', type=int, default=20)
    p.add_argument('--batch_sizes', default='1,64')
    p.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=3)
    args = p.parse_args()
    import numpy as np
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.time()
        prefix, diff = export(args.arch, args.init_channels, args.layers, folder)
        export_seconds = time.time() - t0
        runners = dict(paddle_inference=paddle_predictor(prefix, args.threads),
                       paddle_inference_no_onednn=paddle_predictor(prefix, args.threads, onednn=False),
                       paddle_executor=paddle_executor(prefix),
                       onnxruntime=onnx_session(prefix + '.onnx', args.threads))
        rows = []
        for b in (int(s) for s in args.batch_sizes.split(',')):
            x = np.random.default_rng(b).standard_normal((b, 3, 32, 32)).astype('float32')
            outputs = {name: run(x) for name, run in runners.items()}
            row = dict(batch_size=b, max_abs_difference=max(float(np.abs(outputs['onnxruntime'] - out).max())
                                                            for out in outputs.values()))
            for name, run in runners.items():
                row[f'{name}_images_per_sec'] = b / median_seconds(lambda: run(x), args.steps, args.warmup)
            best_paddle = max(v for k, v in row.items() if k.startswith('paddle') and k.endswith('_per_sec'))
            row['onnxruntime_over_fastest_paddle'] = row['onnxruntime_images_per_sec'] / best_paddle
            rows.append(row)
        print(json.dumps(dict(arch=args.arch, init_channels=args.init_channels, layers=args.layers,
                              threads=args.threads, export_seconds=round(export_seconds, 1),
                              export_check_difference=diff, onnx_bytes=os.path.getsize(prefix + '.onnx'),
                              rows=rows), indent=1))


if __name__ == '__main__':
    main()
