"""Start the landmark service on this machine's Ray (or the cluster RAY_ADDRESS names) and keep it up until Ctrl-C.

    python jobs/serve.py --config configs/serve/quickstart.yaml [--set replicas.num_cpus=2] [--host H] [--port P]
The config is a Ray Serve config file (the one `serve run` / `serve deploy` take); --set overrides its first
application's args. The ensemble's embeddings must exist (jobs/ensemble.py). Then, for example:
    curl --data-binary @photo.jpg -H "Content-Type: image/jpeg" http://127.0.0.1:8000/recognize
"""

import time

from ray_landmark.cli import job_parser, run_job


def main() -> None:
    # Imported here, not at the top: run_job sets Ray's console options first (Ray reads them when imported).
    from ray import serve

    from ray_landmark.config import load_config
    from ray_landmark.infer.config import EnsembleConfig
    from ray_landmark.progress import say
    from ray_landmark.runtime import init_ray
    from ray_landmark.serve.app import start_service
    from ray_landmark.serve.config import read_serve_file

    parser = job_parser(__doc__, default_config="configs/serve/quickstart.yaml")
    parser.add_argument("--host", help="address to listen on (default: the file's http_options.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="default: the file's http_options.port")
    args = parser.parse_args()
    served = read_serve_file(args.config, args.overrides)
    ensemble = load_config(served.settings.ensemble, served.settings.ensemble_overrides, EnsembleConfig)
    init_ray()
    url = start_service(served.settings, ensemble, args.host or served.host, args.port or served.port, served.name,
                        served.route_prefix)
    say(f"[serve] {ensemble.name}: {len(ensemble.models)} models at {url} (/recognize, /retrieve, /healthz, "
        f"/metadata); Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    run_job(main)
