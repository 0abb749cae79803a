"""Create what the local OpenStack needs, idempotently; run by openstack.sh with Debian's python.

    bootstrap.py identity   service users, catalog, the operator's project and user
    bootstrap.py resources  flavors (basic, GPU), a desktop image, quotas, clouds.yaml

Passwords here are for a loopback-only throwaway cloud and are written to the
state dir's clouds.yaml; nothing here is meant for a real deployment.
"""

import io
import os
import pathlib
import sys

import openstack
import yaml

STATE = pathlib.Path(os.environ["OS_STATE_DIR"])
GPU_TOTAL = int(os.environ.get("OS_GPU_TOTAL", "2"))
KEYSTONE = "http://127.0.0.1:5000/v3"
ADMIN_PASSWORD = "admin-local-only"
SERVICE_PASSWORD = "service-local-only"
OPERATOR_PASSWORD = "operator-local-only"
OPERATOR_PROJECT = "analysis"
OPERATOR_USER = "analysis-operator"
CLOUD = "analysis"

SERVICES = {  # service type: (name, endpoint)
    "compute": ("nova", "http://127.0.0.1:8774/v2.1"),
    "placement": ("placement", "http://127.0.0.1:8778"),
    "image": ("glance", "http://127.0.0.1:9292"),
    "network": ("neutron", "http://127.0.0.1:9696"),
}

# The catalogue the tests and the example EnvironmentFlavors refer to. The GPU
# flavor asks placement for one CUSTOM_GPU, which the compute node has
# GPU_TOTAL of (provider config), so the (GPU_TOTAL+1)th server gets
# "No valid host was found" as on a real cloud whose GPUs are all taken.
FLAVORS = {
    "aenv.basic": dict(vcpus=2, ram=4096, disk=10, specs={}),
    "aenv.gpu": dict(
        vcpus=4, ram=8192, disk=10, specs={"resources:CUSTOM_GPU": "1", "trait:CUSTOM_ANALYSIS_GPU": "required"}
    ),
}
IMAGE = "analysis-desktop"


def auth(username, password, project):
    return {
        "auth_url": KEYSTONE,
        "username": username,
        "password": password,
        "project_name": project,
        "user_domain_name": "Default",
        "project_domain_name": "Default",
    }


def connect(username, password, project):
    return openstack.connect(auth=auth(username, password, project), region_name="RegionOne", identity_api_version="3")


def ensure_user(identity, name, password, project, role):
    user = identity.find_user(name) or identity.create_user(name=name, password=password, domain_id="default")
    identity.assign_project_role_to_user(project, user, role)
    return user


def ensure_project(identity, name):
    return identity.find_project(name) or identity.create_project(name=name, domain_id="default")


def ensure_catalog(identity):
    for service_type, (name, url) in SERVICES.items():
        service = identity.find_service(name) or identity.create_service(name=name, type=service_type, is_enabled=True)
        existing = {endpoint.interface for endpoint in identity.endpoints(service_id=service.id)}
        for interface in {"public", "internal"} - existing:
            identity.create_endpoint(service_id=service.id, interface=interface, url=url, region_id="RegionOne")


def identity_phase():
    identity = connect("admin", ADMIN_PASSWORD, "admin").identity
    admin_role = identity.find_role("admin")
    member_role = identity.find_role("member")
    service_project = ensure_project(identity, "service")
    for _, (name, _) in SERVICES.items():
        ensure_user(identity, name, SERVICE_PASSWORD, service_project, admin_role)
    ensure_catalog(identity)
    operator_project = ensure_project(identity, OPERATOR_PROJECT)
    ensure_user(identity, OPERATOR_USER, OPERATOR_PASSWORD, operator_project, member_role)


def ensure_flavors(cloud):
    for name, spec in FLAVORS.items():
        flavor = cloud.compute.find_flavor(name)
        if flavor is None:
            flavor = cloud.compute.create_flavor(
                name=name, vcpus=spec["vcpus"], ram=spec["ram"], disk=spec["disk"], is_public=True
            )
        if spec["specs"]:
            cloud.set_flavor_specs(flavor.id, spec["specs"])


def ensure_image(cloud):
    image = cloud.image.find_image(IMAGE)
    if image is not None and image.status == "active":
        return
    if image is not None:  # a half-created record from an interrupted run
        cloud.image.delete_image(image)
    # The fake virt driver never reads the bits; a few bytes make the image "active".
    cloud.create_image(
        IMAGE,
        data=io.BytesIO(b"fake desktop image"),
        disk_format="raw",
        container_format="bare",
        visibility="public",
        wait=True,
    )


def write_clouds_yaml():
    clouds = {
        "clouds": {
            CLOUD: {
                "auth": auth(OPERATOR_USER, OPERATOR_PASSWORD, OPERATOR_PROJECT),
                "region_name": "RegionOne",
                "identity_api_version": 3,
            },
            f"{CLOUD}-admin": {
                "auth": auth("admin", ADMIN_PASSWORD, "admin"),
                "region_name": "RegionOne",
                "identity_api_version": 3,
            },
        }
    }
    path = STATE / "clouds.yaml"
    path.write_text(yaml.safe_dump(clouds, sort_keys=False))
    path.chmod(0o600)


def resources_phase():
    cloud = connect("admin", ADMIN_PASSWORD, "admin")
    # neutron-server answers its first GET /ports with an AttributeError unless
    # something listed networks first (extension loading order).
    list(cloud.network.networks())
    ensure_flavors(cloud)
    ensure_image(cloud)
    project = cloud.identity.find_project(OPERATOR_PROJECT)
    cloud.set_compute_quotas(project.id, instances=100, cores=1000, ram=4096000)
    write_clouds_yaml()


if __name__ == "__main__":
    {"identity": identity_phase, "resources": resources_phase}[sys.argv[1]]()
