"""Moving bytes to and from storage: the store interface (base), its local-folder and S3 implementations,
the factory that picks one for a URI (routing), checkpoints with manifests, model download, hashing and
cards (models), and the embedded S3 server of local mode. Imports only dhad_api and the standard
library plus minio; never stages/, runtime/, llm/ or evaluation/.
"""
