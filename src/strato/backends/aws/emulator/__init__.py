"""The pieces of Strato's local AWS, which ``strato.backends.aws.local`` starts.

- ``_moto_server``: moto's server (S3, SQS, SNS, DynamoDB and its streams, Step
  Functions, IAM, CloudFormation's bookkeeping), with one fix;
- ``_front``: the endpoint clients use, in front of moto: it runs Lambda functions
  locally (``_local_lambda``, one ``_lambda_worker`` process per warm execution
  environment), runs the event source mappings of DynamoDB streams (``_local_esm``),
  makes moto's conditional writes and receives atomic, and counts every request
  (``_usage``) so that ``strato.backends.aws.usage`` can price a run.

Nothing here is used on AWS itself.
"""
